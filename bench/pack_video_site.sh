#!/usr/bin/env bash
# The second pack the GPU machine needs for video (bench/video.py there): supervision 0.23.0 and its
# dependencies (matplotlib, scipy, pillow, ...), which that machine lacks and which do not fit in one device
# call beside Ray's pack (../shared/device/pack-ray.sh). Wheels for its Python 3.12, tests and sample data
# trimmed: about 31 MiB. Carry it in a call of its own, right after the call that unpacked Ray's site, and
# unpack it into the same folder:  tar -xJf .devsite/video.tar.xz -C /tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d)/site
python3 -m pip install -q --no-deps --target "$site" --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --implementation cp supervision==0.23.0 matplotlib==3.11.2 scipy==1.17.1 pillow==13.0.0 defusedxml==0.7.1 \
  contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3 \
  python-dateutil==2.9.0.post0 six==1.17.0
find "$site" -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
rm -rf "$site/matplotlib/mpl-data/sample_data" "$site/fontTools" "$site/bin" "$site/share"
mkdir -p .devsite
tar -cf - -C "$site" . | xz -6 -T2 > .devsite/video.tar.xz
ls -la .devsite/video.tar.xz

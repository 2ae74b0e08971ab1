"""Classifier chains (`operate_on_classifiers`), per-request choice (`?classifiers=`), batches
(`/v1/infer/batch`) and the `graph-infer` command line, on real Serve apps."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import ValidationError

from serve_app.config import PipelineConfig
from tests.conftest import ROOT, SMALL, deployed, small, without_streams
from tests.images import ASTRONAUT, collage, encode
from tests.onnx_models import fails_on_bright_classifier, slow_classifier

JPEG = {"Content-Type": "image/jpeg"}


def chain_args() -> dict[str, Any]:
    """examples/chain.yaml's args, with small CPU shares so that it fits beside the other test apps."""
    return small(yaml.safe_load((ROOT / "examples/chain.yaml").read_text())["applications"][0]["args"])


def _with(edit: Any) -> dict[str, Any]:
    args = copy.deepcopy(chain_args())
    edit(args)
    return args


def _classifier(args: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in args["classifiers"] if c["name"] == name)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda a: _classifier(a, "gender").update(operate_on_classifiers={"emotion": ["happy"]}),
     "operate_on_classifiers form a cycle: gender -> emotion -> gender"),
    (lambda a: _classifier(a, "emotion").update(operate_on_classifiers={"emotion": ["happy"]}),
     "operate_on_classifiers form a cycle: emotion -> emotion"),
    (lambda a: _classifier(a, "emotion").update(operate_on_classifiers={"gendr": ["female"]}),
     r"classifiers\[emotion\]\.operate_on_classifiers: unknown classifier 'gendr'; the classifiers are age, gender, emotion"),
    (lambda a: _classifier(a, "emotion").update(operate_on_classifiers={"age": ["old"]}),
     r"classifiers\[emotion\]\.operate_on_classifiers\.age: age is expected_value and gives no label to select on"),
    (lambda a: _classifier(a, "emotion").update(operate_on_classifiers={"gender": ["femme"]}),
     r"classifiers\[emotion\]\.operate_on_classifiers\.gender: 'femme' is not a label of gender \(female, male\)"),
])
def test_bad_chains_fail_validation_naming_the_field(edit: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PipelineConfig.model_validate(_with(edit))


def test_the_example_chain_validates_and_lists_its_edge() -> None:
    config = PipelineConfig.model_validate(chain_args())
    assert config.edges() == [("gender", "emotion", ["female"])]
    assert config.with_dependencies(["emotion"]) == ["gender", "emotion"]


@pytest.fixture(scope="module")
def chain_app(serve_url: str) -> Iterator[str]:
    with deployed(serve_url, "chain", without_streams(chain_args())) as url:
        yield url


@pytest.fixture()
def client(chain_app: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=chain_app, timeout=60) as c:
        yield c


def _infer(client: httpx.Client, body: bytes, **params: str) -> dict[str, Any]:
    response = client.post("/v1/infer", content=body, headers=JPEG, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_dependent_classifier_runs_only_on_faces_its_parent_selected(client: httpx.Client) -> None:
    result = _infer(client, encode(collage(), ".jpg"))  # two women, one man
    assert result["errors"] == {}
    genders = [face["attributes"]["gender"]["label"] for face in result["objects"]]
    assert sorted(genders) == ["female", "female", "male"]
    for face in result["objects"]:
        assert "age" in face["attributes"]
        assert ("emotion" in face["attributes"]) == (face["attributes"]["gender"]["label"] == "female")
    edges = client.get("/v1/pipeline").json()["edges"]
    assert edges == [{"parent": "gender", "child": "emotion", "labels": ["female"]}]


def test_sequential_mode_runs_a_topological_order_with_the_same_answer(client: httpx.Client) -> None:
    body = encode(collage(), ".jpg")
    parallel = _infer(client, body)
    sequential = _infer(client, body, mode="sequential", trace="true")
    assert sequential["objects"] == parallel["objects"]
    calls = sequential["trace"]["classifiers"]
    assert calls["emotion"]["start_ms"] >= calls["gender"]["start_ms"] + calls["gender"]["round_trip_ms"]


def test_per_request_choice_runs_the_chosen_classifiers_and_their_parents(client: httpx.Client) -> None:
    body = encode(collage(), ".jpg")
    chosen = _infer(client, body, classifiers="emotion")
    assert {name for face in chosen["objects"] for name in face["attributes"]} == {"gender", "emotion"}
    assert set(chosen["timings_ms"]) == {"detector", "gender", "emotion", "total"}
    only_age = _infer(client, body, classifiers="age")
    assert all(set(face["attributes"]) == {"age"} for face in only_age["objects"])
    unknown = client.post("/v1/infer", content=body, headers=JPEG, params={"classifiers": "age,colour"})
    assert unknown.status_code == 422
    assert unknown.json()["error"] == {
        "code": "unknown_classifier",
        "message": "unknown classifier 'colour'; the classifiers are age, gender, emotion",
    }


def test_a_batch_answers_each_image_in_order_with_its_own_error(client: httpx.Client) -> None:
    images = [ASTRONAUT.read_bytes(), b"not an image at all", encode(collage(), ".jpg")]
    files = [("images", (f"{i}.bin", data, "application/octet-stream")) for i, data in enumerate(images)]
    response = client.post("/v1/infer/batch", files=files)
    assert response.status_code == 200, response.text
    first, broken, third = response.json()["results"]
    assert first["objects"] == _infer(client, images[0])["objects"]
    assert broken == {"error": {"code": "undecodable_image", "message": broken["error"]["message"]}}
    assert len(third["objects"]) == 3
    tiny = encode(collage()[:8, :8], ".png")
    too_many = client.post("/v1/infer/batch", files=[("images", ("a.png", tiny, "image/png"))] * 33)
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_many_images"
    empty = client.post("/v1/infer/batch", files=[("other", ("a.png", images[0], "image/png"))])
    assert empty.status_code == 422 and empty.json()["error"]["code"] == "missing_images_field"


def test_the_cli_sends_a_folder_and_writes_json_lines_and_csv(chain_app: str, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    (photos / "astronaut.png").write_bytes(ASTRONAUT.read_bytes())
    (photos / "more" / "three.jpg").write_bytes(encode(collage(), ".jpg"))
    (photos / "broken.png").write_bytes(b"not a png")
    (photos / "notes.txt").write_text("not an image, and not picked up")
    out, table, drawn = tmp_path / "results.jsonl", tmp_path / "objects.csv", tmp_path / "drawn"
    cli = Path(sys.executable).with_name("graph-infer")
    run = subprocess.run(
        [str(cli), str(photos), "--url", chain_app, "-c", "2", "-o", str(out), "--csv", str(table),
         "--annotated", str(drawn), "--classifiers", "gender"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1, run.stderr  # one image failed
    records = {Path(r["file"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"astronaut.png", "three.jpg", "broken.png"}
    assert records["broken.png"]["error"]["code"] == "undecodable_image"
    assert records["astronaut.png"]["result"]["objects"][0]["attributes"] == {
        "gender": {"label": "female", "score": pytest.approx(0.9999, abs=1e-3)}}
    assert len(records["three.jpg"]["result"]["objects"]) == 3
    assert run.stderr.strip().splitlines()[-1].startswith("images 3, objects 4, errors 1, ")
    rows = table.read_text().splitlines()
    assert rows[0].startswith("file,object,label,score,x1,y1,x2,y2,gender,gender_score") and len(rows) == 5
    assert sorted(str(p.relative_to(drawn)) for p in drawn.rglob("*.jpg")) == ["astronaut.jpg", "more/three.jpg"]
    assert subprocess.run([str(cli), "--help"], capture_output=True, text=True).stdout.startswith("usage: graph-infer")


@pytest.fixture(scope="module")
def faulty_chain_app(serve_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """gender -> emotion, next to `slow` (about 1 s a call, unrelated) and `broken` (fails on every real
    photo) -> `orphan`."""
    models = tmp_path_factory.mktemp("chains")
    args = chain_args()
    gender = _classifier(args, "gender")
    extra = {**gender, "labels": ["a", "b"], "deployment": SMALL}
    extra.pop("labels_file")
    args["classifiers"] = [
        gender,
        _classifier(args, "emotion"),
        {**extra, "name": "slow", "timeout_s": 20, "model": str(slow_classifier(models / "slow.onnx", iterations=900))},
        {**extra, "name": "broken", "model": str(fails_on_bright_classifier(models / "broken.onnx"))},
        {**extra, "name": "orphan", "operate_on_classifiers": {"broken": ["a"]}},
    ]
    with deployed(serve_url, "chains", without_streams(args)) as url:
        yield url


def test_a_dependent_starts_when_its_parent_answers_not_when_every_classifier_has(faulty_chain_app: str) -> None:
    with httpx.Client(base_url=faulty_chain_app, timeout=60) as client:
        result = _infer(client, ASTRONAUT.read_bytes(), trace="true")
    calls = result["trace"]["classifiers"]
    gender, emotion, slow = calls["gender"], calls["emotion"], calls["slow"]
    assert emotion["start_ms"] >= gender["start_ms"] + gender["round_trip_ms"]  # after its parent answered
    assert emotion["start_ms"] < slow["start_ms"] + slow["round_trip_ms"]  # before the unrelated slow one did
    (face,) = result["objects"]
    assert {"gender", "emotion", "slow"} <= set(face["attributes"])


def test_a_failing_parent_makes_its_dependents_skip_with_a_reason(faulty_chain_app: str) -> None:
    with httpx.Client(base_url=faulty_chain_app, timeout=60) as client:
        result = _infer(client, ASTRONAUT.read_bytes())
    assert result["errors"]["broken"]["code"] == "failed"
    assert result["errors"]["orphan"] == {"code": "skipped", "message": "not run: its parent broken failed"}
    (face,) = result["objects"]
    assert face["attributes"]["emotion"]["label"] == "happy"  # the other chain is untouched


def test_annotated_names_keep_the_inputs_paths_and_never_collide(tmp_path: Path) -> None:
    """x/a.png, y/a.png and x/a.jpg: three annotated files, each named after its own input."""
    from graph_client.cli import annotated_names, main

    for name in ("x/a.png", "y/a.png", "x/a.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    files = [tmp_path / "x/a.png", tmp_path / "y/a.png", tmp_path / "x/a.jpg"]
    names = {str(f.relative_to(tmp_path)): str(n) for f, n in annotated_names(files).items()}
    assert names == {"x/a.png": "x/a.png.jpg", "y/a.png": "y/a.jpg", "x/a.jpg": "x/a.jpg.jpg"}
    (tmp_path / "x/a.png.jpg").write_bytes(b"")  # an input literally named like another's fallback
    with pytest.raises(SystemExit) as exit_code:
        main([str(tmp_path / "x"), "--annotated", str(tmp_path / "out"), "--url", "http://127.0.0.1:9"])
    assert exit_code.value.code == 2

"""Config validation: a malformed config fails before anything starts, naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from serve_app.config import DeploymentConfig, PipelineConfig
from serve_app.placement import Placement, PlacementError, check_fits, place, place_streams
from tests.conftest import ROOT, demo_args


def validate(mutate: Any) -> PipelineConfig:
    args = copy.deepcopy(demo_args())
    mutate(args)
    return PipelineConfig.model_validate(args)


def test_shipped_config_is_valid_and_reads_label_files() -> None:
    config = validate(lambda a: None)
    names = [c.name for c in config.classifiers]
    assert names == ["age", "gender", "emotion"]
    age, gender, emotion = config.classifiers
    assert age.values is not None and len(age.values) == 81 and age.values[0] == 0.25 and age.values[-1] == 80
    assert gender.labels == ["female", "male"]
    assert emotion.labels == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert config.detector.mtcnn.pnet.is_absolute() and config.detector.mtcnn.pnet.is_file()


@pytest.mark.parametrize(
    ("mutate", "field_fragment"),
    [
        (lambda a: a["classifiers"][0].update(model="models/nope.onnx"), "file not found: models/nope.onnx"),
        (lambda a: a["detector"]["mtcnn"].update(pnet="missing.onnx"), "file not found: missing.onnx"),
        (lambda a: a["classifiers"][1].update(name="Gender!"), "classifiers.1.name"),
        (lambda a: a["classifiers"][1].update(name="age"), "repeated: ['age']"),
        (lambda a: a["classifiers"][1].update(name="total"), "reserved"),
        (lambda a: a["classifiers"][1].pop("labels_file"), "needs labels"),
        (lambda a: a["classifiers"][0].pop("values_file"), "needs values"),
        (lambda a: a["classifiers"][2]["input"].update(mean=[1, 2, 3]), "mean needs 1 value for GRAY, got 3"),
        (lambda a: a["classifiers"][2]["input"].update(color_format="CMYK"), "classifiers.2.input.color_format"),
        (lambda a: a["classifiers"][0].update(threshold=1.5), "classifiers.0.threshold"),
        (lambda a: a["classifiers"][0].update(timeout_s=0), "classifiers.0.timeout_s"),
        (lambda a: a["classifiers"][0].update(unknown_key=1), "classifiers.0.unknown_key"),
        (lambda a: a["ingress"].update(mode="diagonal"), "ingress.mode"),
        (lambda a: a["detector"]["deployment"].update(num_gpus=1.5), "detector.deployment.num_gpus"),
        (lambda a: a["detector"]["mtcnn"].update(thresholds=[0.6, 0.7, 7]), "thresholds must be probabilities"),
    ],
)
def test_malformed_config_names_the_problem(mutate: Any, field_fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate(mutate)
    assert field_fragment in str(info.value)


def test_no_gpu_falls_back_to_cpu_and_asks_for_no_gpu() -> None:
    config = validate(lambda a: None)
    placement = place("age", config.classifiers[0].deployment, config.classifiers[0].engine, cluster_gpus=0)
    assert (placement.device, placement.num_gpus, placement.num_cpus) == ("cpu", 0.0, 0.25)


def test_gpu_cluster_gives_each_deployment_its_fraction() -> None:
    config = validate(lambda a: None)
    placements = [place(c.name, c.deployment, c.engine, cluster_gpus=1) for c in config.classifiers]
    assert [(p.device, p.num_gpus) for p in placements] == [("auto", 0.25)] * 3
    detector = place("detector", config.detector.deployment, config.detector.engine, cluster_gpus=1)
    check_fits([detector, *placements], [{"CPU": 2, "GPU": 1}])  # 4 x 0.25 of one RTX 3090


def test_the_streams_deployment_holds_its_gpu_share_only_where_it_decodes_on_nvdec() -> None:
    share = DeploymentConfig(num_cpus=0.25, num_gpus=0.05)
    assert place_streams(share, "auto", cluster_gpus=1).num_gpus == 0.05  # NVDEC: the replica must see the card
    assert place_streams(share, "ffmpeg", cluster_gpus=1).num_gpus == 0.0  # FFmpeg on the CPU needs no card
    assert place_streams(share, "auto", cluster_gpus=0).num_gpus == 0.0  # no GPU: FFmpeg, as on this machine
    assert place_streams(DeploymentConfig(num_cpus=0.25, num_gpus=0), "auto", cluster_gpus=1).num_gpus == 0.0
    with pytest.raises(PlacementError, match="streams: ingress.streams.decoder is nvdec, but the Ray cluster has no GPU"):
        place_streams(share, "nvdec", cluster_gpus=0)
    with pytest.raises(PlacementError, match=r"1\.05 GPU in all"):  # its share counts against the card
        check_fits([place_streams(share, "auto", 1), place("ingress", DeploymentConfig(num_gpus=0), None, 1),
                    Placement("ingress", "cuda", 0.25, 0.5, 2)], [{"CPU": 16, "GPU": 1}])


def test_explicit_cuda_without_gpu_fails_loudly() -> None:
    config = validate(lambda a: a["classifiers"][0]["engine"].update(device="cuda"))
    with pytest.raises(PlacementError, match="age: device 'cuda' is configured but the Ray cluster has no GPU"):
        place("age", config.classifiers[0].deployment, config.classifiers[0].engine, cluster_gpus=0)


def test_plan_that_cannot_be_scheduled_fails_instead_of_waiting() -> None:
    from serve_app.app import bind_pipeline

    config = validate(lambda a: a["classifiers"][0]["deployment"].update(num_cpus=1, num_replicas=2))
    with pytest.raises(PlacementError, match=r"need 3\.5 CPU in all .*age 1 x 2,.*streams 0\.25 x 1\) but the Ray cluster has 2;"):
        bind_pipeline(config, [{"CPU": 2.0}])


def test_shipped_config_fits_a_two_core_machine() -> None:
    from serve_app.app import bind_pipeline

    options = _actor_options(bind_pipeline(validate(lambda a: None), [{"CPU": 2.0}]))
    assert set(options) == {"ingress", "detector", "age", "gender", "emotion", "streams"}
    assert sum(o["num_cpus"] for o in options.values()) <= 2.0
    assert all(o["num_gpus"] == 0 for o in options.values())  # no GPU here: the GPU fractions fall back to CPU


def test_placement_counts_custom_resources_and_per_node_fit() -> None:
    from serve_app.app import bind_pipeline

    document = yaml.safe_load((ROOT / "examples/autoscaling.yaml").read_text())
    autoscaling = PipelineConfig.model_validate(document["applications"][0]["args"])
    with pytest.raises(PlacementError, match=r"need 0\.6 classifier_node in all .* cluster has 0 \(start a node"):
        bind_pipeline(autoscaling, [{"CPU": 8.0, "GPU": 1.0}])
    with pytest.raises(PlacementError, match=r"age: one replica asks for CPU 0\.1, GPU 0\.1, classifier_node 0\.1, more than any single node"):
        bind_pipeline(autoscaling, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "classifier_node": 4.0}])  # no node has both
    bind_pipeline(autoscaling, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0, "classifier_node": 4.0}])  # fits

    # layout ingress puts 1.5 CPU in one replica: two nodes of 1 CPU hold 2 in all but not that replica
    config = validate(lambda a: a.update(layout="ingress"))
    with pytest.raises(PlacementError, match=r"ingress: one replica asks for CPU 1\.5, more than any single node"):
        bind_pipeline(config, [{"CPU": 1.0}, {"CPU": 1.0}])


def test_validate_command_accepts_the_shipped_config_and_names_a_bad_field(tmp_path: Path) -> None:
    from serve_app.validate import main

    assert main([str(ROOT / "serve_config.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "serve_config.yaml").read_text().replace("models/gender.onnx", "models/gone.onnx"))
    assert main([str(bad)]) == 1


def test_validate_command_names_file_line_and_column_of_a_yaml_error(tmp_path: Path, capsys: Any) -> None:
    from serve_app.validate import main

    broken = tmp_path / "broken.yaml"
    broken.write_text("applications:\n  - name: faces\n    args: {detector: [unclosed\n")
    assert main([str(broken)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"{broken}: not valid YAML at line 4, column 1:")
    assert main([str(tmp_path / "missing.yaml")]) == 1
    assert capsys.readouterr().err.strip() == f"{tmp_path / 'missing.yaml'}: cannot read the file: No such file or directory"
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    assert main([str(scalar)]) == 1
    assert "expected a Serve config" in capsys.readouterr().err


def test_validate_checks_model_shapes_and_prints_one_line_per_problem(tmp_path: Path, capsys: Any) -> None:
    from serve_app.validate import main

    shipped = (ROOT / "serve_config.yaml").read_text()
    wrong_size = tmp_path / "wrong_size.yaml"
    wrong_size.write_text(shipped.replace("width: 32, height: 32", "width: 48, height: 48"))
    assert main([str(wrong_size)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{wrong_size}: application 'faces': classifiers[gender] (model gender.onnx): "
                   "input 'images' takes shape ['N', 3, 32, 32], got [1, 3, 48, 48]"]
    two_bad = tmp_path / "two_bad.yaml"
    two_bad.write_text(shipped.replace("models/age.onnx", "models/gone.onnx").replace("mode: parallel", "mode: fast"))
    assert main([str(two_bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and not any("errors.pydantic.dev" in line or "Traceback" in line for line in err)
    assert "classifiers.0.model: file not found: models/gone.onnx" in err[0] and "ingress.mode:" in err[1]
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0 and "one line per problem" in capsys.readouterr().out


def test_validate_notes_a_port_in_use_without_failing(tmp_path: Path, capsys: Any) -> None:
    import socket

    from serve_app.validate import main

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "busy.yaml"
        config.write_text((ROOT / "serve_config.yaml").read_text().replace("port: 8000", f"port: {port}"))
        assert main([str(config)]) == 0  # the config is fine; the address is busy now
    err = capsys.readouterr().err
    assert f"note: 127.0.0.1:{port} (http_options) is in use now" in err and f"sport = :{port}" in err


def test_example_configs_validate() -> None:
    from serve_app.validate import main

    assert main([str(ROOT / "examples/autoscaling.yaml"), "--resources", "classifier_node=4"]) == 0
    assert main([str(ROOT / "examples/autoscaling.yaml")]) == 1  # nothing offers classifier_node
    # two ingress replicas, each holding every model: 3.25 CPUs of replicas, for a GPU box's cores
    assert main([str(ROOT / "examples/faces_gpu.yaml"), "--gpus", "1", "--cpus", "16"]) == 0
    assert main([str(ROOT / "examples/faces_gpu.yaml")]) == 1  # device cuda, and no GPU: refused up front
    two = str(ROOT / "examples/faces_2gpu.yaml")
    assert main([two, "--gpus", "2", "--cpus", "16"]) == 0
    assert main([two, "--gpus", "1", "--cpus", "16"]) == 1  # eight quarter-card replicas cannot fit on one card
    assert main([two, "--gpus", "2", "--cpus", "2"]) == 1  # nor 3.25 CPUs of replicas on 2


def test_stop_settings_reach_every_deployment_and_serve_defaults_stay_otherwise() -> None:
    from serve_app.app import bind_pipeline

    def stop_settings(config: PipelineConfig) -> dict[str, tuple[float, float]]:
        configs = _deployment_configs(bind_pipeline(config, [{"CPU": 4.0}]))
        return {name: (c.graceful_shutdown_wait_loop_s, c.graceful_shutdown_timeout_s) for name, c in configs.items()}

    assert set(stop_settings(validate(lambda a: None)).values()) == {(2.0, 20.0)}  # Serve's own defaults
    quick = validate(lambda a: a["classifiers"][1]["deployment"].update(graceful_shutdown_wait_loop_s=0.25,
                                                                          graceful_shutdown_timeout_s=5))
    settings = stop_settings(quick)
    assert settings.pop(quick.classifiers[1].name) == (0.25, 5.0)
    assert set(settings.values()) == {(2.0, 20.0)}
    with pytest.raises(ValueError, match="graceful_shutdown_wait_loop_s"):
        validate(lambda a: a["detector"]["deployment"].update(graceful_shutdown_wait_loop_s=0))


def _actor_options(app: Any) -> dict[str, dict[str, Any]]:
    """Each deployment of a bound application: name -> ray_actor_options."""
    return {name: deployment._replica_config.ray_actor_options for name, deployment in _deployments(app).items()}


def _deployment_configs(app: Any) -> dict[str, Any]:
    """Each deployment of a bound application: name -> Serve's DeploymentConfig."""
    return {name: deployment._deployment_config for name, deployment in _deployments(app).items()}


def _deployments(app: Any) -> dict[str, Any]:
    """Each deployment of a bound application (the ingress's and those bound into it): name -> Serve's Deployment."""
    found: dict[str, Any] = {}

    def walk(value: Any) -> None:
        if isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif hasattr(value, "_bound_deployment"):  # a bound Serve Application
            deployment = value._bound_deployment
            replica = deployment._replica_config
            found[deployment.name] = deployment
            walk(replica.init_args)
            walk(replica.init_kwargs)

    walk(app)
    return found


def test_each_layout_binds_its_deployments_with_the_summed_fractions() -> None:
    from serve_app.app import bind_pipeline

    gpu = [{"CPU": 4.0, "GPU": 1.0}]
    separate = _actor_options(bind_pipeline(validate(lambda a: None), nodes=gpu))
    assert set(separate) == {"ingress", "detector", "age", "gender", "emotion", "streams"}
    colocated = _actor_options(bind_pipeline(validate(lambda a: a.update(layout="colocated")), nodes=gpu))
    assert set(colocated) == {"ingress", "detector", "classifiers", "streams"}
    assert (colocated["classifiers"]["num_gpus"], colocated["classifiers"]["num_cpus"]) == (0.75, 0.75)
    ingress = _actor_options(bind_pipeline(validate(lambda a: a.update(layout="ingress")), nodes=gpu))
    assert set(ingress) == {"ingress", "streams"}
    assert ingress["streams"]["num_gpus"] == 0  # it holds no model: in layout ingress it calls the ingress
    assert (ingress["ingress"]["num_gpus"], ingress["ingress"]["num_cpus"]) == (1.0, 1.5)


def test_a_layout_that_puts_more_than_one_gpu_in_a_replica_fails_naming_the_fractions() -> None:
    from serve_app.app import bind_pipeline

    config = validate(lambda a: [a.update(layout="ingress"), a["detector"]["deployment"].update(num_gpus=0.5)])
    with pytest.raises(PlacementError, match=r"ingress: the models it hosts ask for 1\.25 GPUs in all \(detector 0\.5"):
        bind_pipeline(config, [{"CPU": 4.0, "GPU": 1.0}])


@pytest.mark.parametrize("layout", ["separate", "colocated", "ingress"])
def test_cpu_work_auto_is_the_loop_in_every_layout_and_an_explicit_choice_is_kept(layout: str) -> None:
    assert validate(lambda a: a.update(layout=layout)).cpu_work == "loop"
    assert validate(lambda a: (a.update(layout=layout), a["ingress"].update(cpu_work="threads"))).cpu_work == "threads"

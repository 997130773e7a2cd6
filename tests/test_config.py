from pathlib import Path

import pytest
import yaml
from conftest import REPO

from empathy_distill.shared.config import PipelineConfig, load_config, write_resolved
from empathy_distill.shared.errors import PipelineError


def test_every_shipped_pipeline_validates():
    doc = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    assert "demo" in doc["pipelines"]
    for name in doc["pipelines"]:
        cfg = load_config(REPO / "pipelines.yaml", name)
        assert cfg.name == name
        assert cfg.teacher.model.is_absolute() and cfg.teacher_cache.output.is_absolute()


def test_overrides_and_paths_resolve_against_the_config_file(tmp_path):
    cfg = load_config(
        REPO / "pipelines.yaml",
        "demo",
        ["teacher_cache.top_k=7", "teacher.engine.max_model_len=1024", "teacher_cache.output=out"],
    )
    assert cfg.teacher_cache.top_k == 7
    assert cfg.teacher.engine["max_model_len"] == 1024
    assert cfg.teacher.engine["dtype"] == "float32"  # the rest of the engine dict is kept
    assert cfg.teacher_cache.output == REPO / "out"
    written = write_resolved(cfg, tmp_path)
    again = PipelineConfig.model_validate(yaml.safe_load(written.read_text()))
    assert again == cfg


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "pipelines:\n  x:\n    teacher_cache: {top_k: 0, bogus: 1}\n    nonsense: true\n"
    )
    with pytest.raises(PipelineError) as err:
        load_config(path, "x")
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "teacher_cache.top_k" in msg and "teacher_cache.bogus" in msg and "nonsense" in msg


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_text("pipelines:\n  other: {}\n"), "no pipeline named 'demo'"),
        (lambda p: p.write_text("just text"), "top-level 'pipelines:'"),
        (lambda p: p.write_text("pipelines: [unclosed"), "cannot read config"),
        (lambda p: p.write_text("pipelines:\n  demo:\n    a: [1\n    b: 2\n"), r"line \d+, col"),
        (lambda p: p.write_text("pipelines:\n  demo: [1, 2]\n"), "'demo' is a list"),
        (lambda p: p.write_text("pipelines:\n  demo: some text\n"), "'demo' is a str"),
    ],
)
def test_config_file_errors_are_one_readable_line(tmp_path, setup, match):
    path = tmp_path / "p.yaml"
    setup(path)
    with pytest.raises(PipelineError, match=match) as err:
        load_config(path, "demo")
    assert "\n" not in str(err.value)


def test_bad_set_syntax(tmp_path):
    with pytest.raises(PipelineError, match="expected key=value"):
        load_config(REPO / "pipelines.yaml", "demo", ["teacher_cache.top_k"])
    with pytest.raises(PipelineError, match="not a section"):
        load_config(REPO / "pipelines.yaml", "demo", ["name.x=1"])
    for value in ("teacher_cache.inputs=[unclosed", "teacher.top_p=@x"):
        with pytest.raises(PipelineError, match="not valid YAML") as err:
            load_config(REPO / "pipelines.yaml", "demo", [value])
        assert "\n" not in str(err.value)


def test_an_engine_setting_vllm_does_not_take_is_refused_with_the_close_match():
    from empathy_distill.shared.models import check_engine_settings

    for name in yaml.safe_load((REPO / "pipelines.yaml").read_text())["pipelines"]:
        cfg = load_config(REPO / "pipelines.yaml", name)
        check_engine_settings({**cfg.teacher.engine, **cfg.evaluate.engine})
    with pytest.raises(PipelineError, match="did you mean 'max_model_len'"):
        check_engine_settings({"max_modle_len": 512})


def test_default_paths_are_relative_in_the_model():
    assert PipelineConfig().teacher.model == Path("models/smollm2-135m-instruct")


def test_several_teacher_engines_need_the_ray_backend():
    with pytest.raises(PipelineError, match="workers > 1 runs on Ray"):
        load_config(REPO / "pipelines.yaml", "demo", ["teacher_cache.workers=2"])
    cfg = load_config(
        REPO / "pipelines.yaml",
        "demo",
        ["teacher_cache.workers=2", "teacher_cache.backend=ray", "teacher_cache.ray.address=auto"],
    )
    assert cfg.teacher_cache.ray.address == "auto" and cfg.teacher_cache.ray.num_gpus is None

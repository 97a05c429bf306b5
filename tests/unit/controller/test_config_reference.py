"""docs/configuration.md: generated from controller/config.py, complete, and true to the models."""

import json
import re
import typing
from typing import Literal

import annotated_types as at
import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from controller import config_reference as ref
from controller.config import JobConfig


def _leaves(model: type[BaseModel], prefix: str = ""):
    """(dotted key, FieldInfo) of every leaf of `model`, walked here independently of `ref`."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        # An optional section (`LoraConfig | None`) lists its fields like a section.
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            ann = args[0]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaves(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """key -> [type, default, constraint, description], parsed back from the Markdown tables."""
    out = {}
    for line in markdown.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace(r"\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        key = cells[0].strip("`")
        assert key not in out, f"{key} is listed twice"
        out[key] = [c.strip("`") if i < 2 else c for i, c in enumerate(cells[1:])]
    return out


@pytest.fixture(scope="module")
def rendered() -> str:
    return ref.render()


@pytest.fixture(scope="module")
def table(rendered) -> dict[str, list[str]]:
    return _table_rows(rendered)


def test_checked_in_reference_is_up_to_date(rendered):
    on_disk = ref.OUTPUT.read_text(encoding="utf-8") if ref.OUTPUT.is_file() else ""
    assert on_disk == rendered, (
        f"docs/configuration.md is stale (fix: {ref.COMMAND}, then commit the file)")


def test_check_flag_exits_1_on_a_stale_file_and_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ref, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(ref, "OUTPUT", tmp_path / "docs" / "configuration.md")
    assert ref.main(["--check"]) == 1  # missing
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"fix: {ref.COMMAND}" in err and "docs/configuration.md" in err
    assert ref.main([]) == 0
    assert ref.main(["--check"]) == 0
    ref.OUTPUT.write_text(ref.OUTPUT.read_text() + "edited by hand\n")
    assert ref.main(["--check"]) == 1


def test_output_path_comes_from_the_module_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ref.OUTPUT == ref.REPO_ROOT / "docs" / "configuration.md"
    assert (ref.REPO_ROOT / "controller" / "config.py").is_file()


def test_every_leaf_field_is_listed_with_a_doc(table):
    leaves = dict(_leaves(JobConfig))
    assert len(leaves) > 100  # the walk reached every section
    undocumented = [k for k, f in leaves.items() if not (f.description or "").strip()]
    assert not undocumented, f"fields without a docstring under them: {undocumented}"
    assert sorted(table) == sorted(leaves)
    empty = [k for k, cells in table.items() if not cells[3].strip()]
    assert not empty, f"rows with an empty description: {empty}"


def test_every_section_field_is_documented():
    missing = [k for k, f in JobConfig.model_fields.items() if not (f.description or "").strip()]
    assert not missing


def test_constraints_and_choices_match_the_models(table):
    ops = {at.Ge: (">=", "ge"), at.Gt: (">", "gt"), at.Le: ("<=", "le"), at.Lt: ("<", "lt")}
    for key, field in _leaves(JobConfig):
        type_cell, _, constraint, _ = table[key]
        for m in field.metadata:
            for cls, (op, attr) in ops.items():
                if isinstance(m, cls):
                    assert f"{op} {getattr(m, attr)}" in constraint, (key, constraint)
            if isinstance(m, at.MinLen):
                assert f"min_length={m.min_length}" in constraint, (key, constraint)
        ann = field.annotation
        for arg in (typing.get_args(ann) if typing.get_origin(ann) is not Literal else (ann,)):
            if typing.get_origin(arg) is Literal:
                for choice in typing.get_args(arg):
                    assert json.dumps(choice) in type_cell, (key, type_cell)


def test_defaults_read_back_as_yaml_to_the_models_defaults(table):
    # A default copied from the reference into a YAML file or an override means the default.
    # (An optional section's fields default to its class's defaults once the section is set.)
    dumped = JobConfig.model_validate({"model": {"lora": {}}}).model_dump(mode="json")
    for key, (_, default, _, _) in table.items():
        value = dumped
        for part in key.split("."):
            value = value[part]
        assert yaml.safe_load(default) == value, key


def test_spot_rows(table):
    assert table["sampling.group_size"][:3] == ["int", "8", ">= 2"]
    assert table["sampling.group_size"][3].startswith("G: completions per prompt")
    assert table["algorithm.epsilon"][:3] == ["float", "0.2", "> 0, < 1"]
    assert "ε" in table["algorithm.epsilon"][3]
    assert "β" in table["algorithm.beta"][3]
    assert table["status.port"][2] == ">= 0, <= 65535"
    assert table["schedule.kind"][:2] == ['"sync" | "async" | "colocated"', '"sync"']
    assert table["reshard.dtype"][0] == '"float32" | "bfloat16" | None'
    assert table["rewards.functions"][:3] == ["list[str]", '["reverse_digits"]', "min_length=1"]
    assert table["run.output_dir"][:2] == ["str | None", "null"]
    assert table["topology.sampler_rules"][0] == "dict[str, str | None]"
    assert table["model.norm_eps"][1] == "1.0e-06"  # YAML reads 1e-06 as a string
    assert table["run.name"][2] == "pattern `^[A-Za-z0-9][A-Za-z0-9_.-]*$`"


# A made-up config with the shapes JobConfig does not use today: a nested model inside a
# section and a discriminated union of backends.
class _Inner(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)
    depth: int = Field(2, ge=1)
    """How deep."""


class _Llama(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)
    type: Literal["llama"] = "llama"
    """Selects this backend."""
    rope: float = Field(1e4, gt=0)
    """RoPE base."""


class _Gemma(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)
    type: Literal["gemma"] = "gemma"
    """Selects this backend."""
    window: int | None = None
    """Sliding window."""


class _Section(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)
    inner: _Inner = _Inner()
    """Nested."""
    arch: _Llama | _Gemma = Field(_Llama(), discriminator="type")
    """The backend."""
    mode: Literal["a", "b"] | None = None
    """A choice."""


def test_walk_handles_nested_models_and_discriminated_unions():
    rows = list(ref.iter_rows(_Section, "sec."))
    assert [r.key for r in rows] == [
        "sec.inner.depth",  # a nested model contributes its leaves
        "sec.arch", "sec.arch.type", "sec.arch.rope", "sec.arch.type", "sec.arch.window",
        "sec.mode",
    ]
    depth, arch, _, rope, _, window, mode = rows
    assert (depth.type, depth.default, depth.constraint, depth.doc) == ("int", "2", ">= 1",
                                                                         "How deep.")
    assert arch.type == "_Llama | _Gemma" and arch.doc == "The backend."
    assert arch.default == '{"type": "llama", "rope": 10000.0}'
    assert rope.doc == '(when sec.arch is `type: "llama"`) RoPE base.'
    assert window.doc == '(when sec.arch is `type: "gemma"`) Sliding window.'
    assert (mode.type, mode.default) == ('"a" | "b" | None', "null")
    assert r'`"a" \| "b" \| None`' in ref.render_table(rows)

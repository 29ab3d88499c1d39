"""docs/config.md is generated from the config dataclasses and must be current; every key has a meaning."""

from __future__ import annotations

import dataclasses
from typing import Literal

from gift_megatron import config_doc


def test_committed_config_reference_is_current():
    with open(config_doc.DEFAULT_OUT, encoding="utf-8") as fh:
        committed = fh.read()
    assert committed == config_doc.render(), "docs/config.md is stale: run python -m gift_megatron.config_doc"


def test_every_config_key_has_a_meaning():
    missing = config_doc.undocumented()
    assert not missing, "config keys without an entry ('key: meaning') in their class docstring: " + ", ".join(missing)


@dataclasses.dataclass
class Inner:
    """theta: a key of a nested section."""

    theta: int = 7


def test_generator_reads_entries_types_and_defaults_of_a_new_section(tmp_path, capsys):
    @dataclasses.dataclass
    class NewSection:
        """What the section is for.

        alpha: the first key; it spans
            two lines. beta / gamma: shared by two keys. delta with epsilon: a pair (0: off).
        """

        alpha: int = 3
        beta: float | None = None
        gamma: Literal["a", "b"] = "a"
        delta: list[str] = dataclasses.field(default_factory=list)
        epsilon: bool = True
        zeta: float = 3e-4
        """an attribute docstring: ``literal`` text."""
        eta: str = "x"
        sub: Inner = dataclasses.field(default_factory=lambda: Inner())

    intro, rows = config_doc.rows(NewSection)
    assert intro == "What the section is for."
    table = {key: (tp, default, meaning) for key, tp, default, meaning in rows}
    assert table["alpha"] == ("int", "`3`", "the first key; it spans two lines.")
    assert table["beta"] == ("float or null", "`null`", "shared by two keys.")
    assert table["gamma"] == ("one of `a`, `b`", '`"a"`', "shared by two keys.")
    assert table["delta"][:2] == ("list of str", "`[]`") and table["delta"][2] == "a pair (0: off)."
    assert table["epsilon"][2] == "a pair (0: off)."
    assert table["zeta"] == ("float", "`3.0e-04`", "an attribute docstring: `literal` text.")
    assert table["eta"][2] == ""  # no entry: reported by undocumented() / --check
    assert table["sub.theta"] == ("int", "`7`", "a key of a nested section.")


def test_check_mode_fails_on_a_stale_file(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert config_doc.main(["--out", str(out)]) == 0
    assert config_doc.main(["--out", str(out), "--check"]) == 0
    out.write_text(out.read_text().replace("| `run.seed` |", "| `run.sed` |"))
    assert config_doc.main(["--out", str(out), "--check"]) == 1
    assert "is stale" in capsys.readouterr().err

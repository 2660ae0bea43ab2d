"""python -m deit_fast.info: the report names a backend for every registered op."""

import deit_fast.ops  # noqa: F401  (registers every op)
from deit_fast import _backend, info


def test_report_covers_every_op(capsys):
    """Each op registered with the dispatcher gets a backend line (not an error), and main() prints the report."""
    rows = dict(info.report())
    for name in _backend.ops():
        assert not rows[f"op {name}"].startswith("error"), rows[f"op {name}"]
        assert rows[f"op {name}"].split()[0] in _backend.BACKENDS
    info.main()
    assert "op batch_prep" in capsys.readouterr().out

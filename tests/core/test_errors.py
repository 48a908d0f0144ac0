"""User errors reach the user as one sentence: in the CLI and in notebooks."""

from __future__ import annotations

from maps_utils.cli import main
from maps_utils.core.errors import install_notebook_handler


def test_cli_prints_one_line_and_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MAPS_CACHE_DIR", str(tmp_path))
    assert main(["info", "no-such-model-xyz", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Model 'no-such-model-xyz' is not an embedded model")
    assert "\n" not in err and "Traceback" not in err


def test_cli_lists_embedded_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out


def test_notebook_handler_shows_only_the_message(capfd):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    monkey_get = lambda: shell  # noqa: E731
    import IPython

    original = IPython.get_ipython
    IPython.get_ipython = monkey_get
    try:
        install_notebook_handler()
    finally:
        IPython.get_ipython = original
    shell.run_cell(f"raise __import__('maps_utils').ModelNotFoundError({'Model x is missing; fix it.'!r})")
    err = capfd.readouterr().err
    assert "ModelNotFoundError: Model x is missing; fix it." in err
    assert "Traceback" not in err
    shell.run_cell("raise ValueError('ordinary')")  # other errors keep their traceback
    assert "Traceback" in "".join(capfd.readouterr())

"""docs/adding-an-env.md stays true: its example env module and its test are run exactly as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-an-env.md"


def test_the_worked_example_runs_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    files = {b.splitlines()[0].removeprefix("# ").strip(): b for b in blocks}
    assert set(files) == {"my_envs.py", "test_my_envs.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))  # env workers (spawned) inherit sys.path
    import test_my_envs

    import sage_gym

    try:
        test_my_envs.test_guess_env(tmp_path / "run")
        spec = sage_gym.spec("guess-train")
        assert spec.has_train_split and spec.entry_point == "my_envs:GuessEnv"
        import gymnasium
        from gymnasium.utils.env_checker import check_env

        env = gymnasium.make("sage/guess-test-v0")  # registered with gymnasium too
        check_env(env.unwrapped, skip_render_check=True)
        env.close()
    finally:
        for module in ("test_my_envs", "my_envs"):
            sys.modules.pop(module, None)

"""The worker's parent process imports the training interface without torch."""

from __future__ import annotations

import subprocess
import sys


def test_interface_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import tuneforge.training, tuneforge.training.interface, tuneforge.training.formats\n"
        "import tuneforge.training.run, tuneforge.training.hyperparams\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "for banned in ('tuneforge.api', 'tuneforge.db', 'sqlalchemy', 'fastapi'):\n"
        "    assert banned not in sys.modules, banned\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_training_package_imports_neither_api_nor_db() -> None:
    code = (
        "import sys\n"
        "import tuneforge.training.run, tuneforge.training.supervised, tuneforge.training.dpo\n"
        "import tuneforge.training.pretraining, tuneforge.training.__main__\n"
        "bad = [m for m in ('tuneforge.api', 'tuneforge.db', 'sqlalchemy', 'fastapi') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr

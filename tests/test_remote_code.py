"""Exports load through transformers' remote code: in a process that never imported bmojo, and by path alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.data.tokenizer import byte_tokenizer
from bmojo.remote import AUTO_MAP, REMOTE_CODE_FILES
from bmojo.train import export_model

PROMPT = "the cat sees a dog. the dog"


def export_small_model(folder: Path) -> BmojoForCausalLM:
    """Export a small random M+B model with the byte tokenizer to ``folder``; returns the model, in eval mode."""
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    config = BmojoConfig(layer_pattern="MB", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    model = BmojoForCausalLM(config).eval()
    export_model(model, tokenizer, folder)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A small exported model's folder, and its logits on ``PROMPT`` ``[1, T, V]``."""
    folder = tmp_path_factory.mktemp("remote") / "export"
    model = export_small_model(folder)
    with torch.no_grad():
        return folder, model(byte_tokenizer()(PROMPT, return_tensors="pt")["input_ids"]).logits


def run_fresh_python(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``script`` in a new interpreter, offline, with its own transformers modules cache and no stdin."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_export_names_its_remote_modules_and_still_loads_after_import_bmojo(exported):
    folder, logits = exported
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert all((folder / name).is_file() for name in REMOTE_CODE_FILES)
    local = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert type(local) is BmojoForCausalLM
    with torch.no_grad():
        assert torch.equal(local(byte_tokenizer()(PROMPT, return_tensors="pt")["input_ids"]).logits, logits)


def test_plain_save_pretrained_writes_the_same_remote_code_as_an_export(exported, tmp_path):
    folder, _ = exported
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"] == AUTO_MAP
    for name in REMOTE_CODE_FILES:
        assert (tmp_path / "saved" / name).read_bytes() == (folder / name).read_bytes()


def test_fresh_process_asks_for_trust_remote_code_then_loads_the_export_without_importing_bmojo(exported, tmp_path):
    folder, logits = exported
    script = f"""
        import sys
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r})
        except ValueError as error:
            print("refused:", error)
        else:
            raise SystemExit("loaded without trust_remote_code")
        assert "bmojo" not in sys.modules
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print("class:", type(model).__module__, type(model).__name__)
        with torch.no_grad():
            torch.save(model(tokenizer({PROMPT!r}, return_tensors="pt")["input_ids"]).logits, "logits.pt")
        model.save_pretrained("resaved")
    """
    result = run_fresh_python(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "contains custom code" in result.stdout and "trust_remote_code=True" in result.stdout
    assert "class: transformers_modules." in result.stdout and "modeling_bmojo BmojoForCausalLM" in result.stdout
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits)
    # A model loaded through remote code saves with the same small modules, so the copy loads the same way.
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert all((tmp_path / "resaved" / name).is_file() for name in REMOTE_CODE_FILES)


def test_without_bmojo_installed_loading_says_pip_install_bmojo(exported, tmp_path):
    folder, _ = exported
    script = f"""
        import sys
        from importlib.abc import MetaPathFinder

        class Uninstalled(MetaPathFinder):  # looking bmojo up fails as where it is not installed
            def find_spec(self, name, path, target=None):
                if name == "bmojo":
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Uninstalled())
        from transformers import AutoModelForCausalLM

        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        except ImportError as error:
            print("failed:", error)
        else:
            raise SystemExit("loaded without bmojo")
    """
    result = run_fresh_python(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed: This model is a B'MOJO model" in result.stdout and "`pip install bmojo`" in result.stdout

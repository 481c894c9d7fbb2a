"""GGUF export: the merged model converted by llama.cpp's own converter, plus an Ollama `Modelfile`.

The converter (`convert_hf_to_gguf.py`, its `conversion/` package and the `gguf-py` it was written
against) ships in the `llama-cpp-python` source distribution, not in any wheel. `make` (through
`python -m tuneforge.training.gguf install-converter`) takes those files from the same sdist, at the
same version, that pip compiled the installed `llama_cpp` from, and keeps them under
`<venv>/share/tuneforge/llama.cpp/`. The converter runs in its own process, as llama.cpp's own
script with its own `gguf-py`; we change its behaviour only through its extension points:

- Its model registry (`ModelBase.register`): the architecture's converter class is replaced by a
  subclass that (1) names the BPE pre-tokenizer when the converter's table of known tokenizer
  hashes does not know ours (tiny-chat's trained tokenizer, any newly trained one): a byte-level
  pre-tokenizer with GPT-2's split regex and no normalizer is llama.cpp's `gpt-2` pre-tokenizer,
  whatever the merges; anything else still fails as upstream does; and (2) stores the chat template
  without transformers' `{% generation %}` markers (they only mark the assistant tokens for
  training loss, render nothing, and are not Jinja that llama.cpp or jinja2 know).

The `Modelfile`'s TEMPLATE (Go template) and stop tokens are derived from the training chat
template by rendering it around placeholder contents: what comes before, around and after each
role's content, and the generation prompt, checked by rendering a whole conversation both ways.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# `export` entries that make a GGUF, and the converter's --outtype for each.
OUTTYPES = {"gguf": "f16", "gguf_q8_0": "q8_0"}
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
DISTRIBUTION = "llama-cpp-python"
# What install-converter takes from the sdist's vendor/llama.cpp/.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
# Imported by the converter for Llama-family tokenizers (even those without a tokenizer.model).
CONVERTER_MODULES = ("sentencepiece", "numpy", "torch", "transformers")
INSTALL_HINT = "pip install 'tuneforge[gguf]' && python -m tuneforge.training.gguf install-converter"
GENERATION_TAGS = re.compile(r"\{%-?\s*(?:generation|endgeneration)\s*-?%\}")


class GgufError(RuntimeError):
    """The model could not be exported to GGUF (the converter's own message)."""


def gguf_outtype(export: Sequence[str]) -> str | None:
    """The converter outtype the job's `export` asks for (q8_0 wins over f16 if both), or None."""
    kinds = [kind for kind in ("gguf_q8_0", "gguf") if kind in export]
    return OUTTYPES[kinds[0]] if kinds else None


def converter_dir() -> Path:
    return Path(sys.prefix) / "share" / "tuneforge" / "llama.cpp"


def missing_requirements() -> list[str]:
    """What this installation lacks to export GGUF (empty: it can). Imports nothing heavy."""
    missing = [name for name in CONVERTER_MODULES if importlib.util.find_spec(name) is None]
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        missing.append(f"llama.cpp's converter (in {converter_dir()})")
    return missing


# --- installing the converter ------------------------------------------------------------------


def install_converter(target: Path | None = None, archive: Path | None = None) -> Path:
    """Copies the converter out of the llama-cpp-python sdist of the installed version (pip
    downloads it, or takes it from its cache: it is the archive pip compiled the wheel from), or
    out of `archive`."""
    target = target or converter_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if archive is None:
            version = importlib.metadata.version(DISTRIBUTION)
            download = ["download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp]
            subprocess.run([sys.executable, "-m", "pip", *download, f"{DISTRIBUTION}=={version}"], check=True)
            archive = next(Path(tmp).glob("*.tar.gz"))
        staging = Path(tmp) / "converter"
        with tarfile.open(archive, "r:gz") as tar:
            root = tar.getnames()[0].split("/")[0]
            prefix = f"{root}/vendor/llama.cpp/"
            wanted = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix)
                and m.name[len(prefix) :].split("/")[0] in CONVERTER_PARTS
                and "/tests/" not in m.name
            ]
            for member in wanted:
                member.name = member.name[len(prefix) :]
            tar.extractall(staging, members=wanted, filter="data")
        (staging / "VERSION").write_text(f"{root}\n")
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, target)
    return target


# --- the Ollama Modelfile ----------------------------------------------------------------------


class TemplateNotDerived(ValueError):
    """The chat template is not a concatenation of per-role turns that a Go template can say."""


@dataclass
class OllamaTemplate:
    header: str  # before the first message (a BOS token written by the template)
    turns: dict[str, tuple[str, str]]  # role -> (before content, after content)
    generation_prompt: str
    stops: list[str] = field(default_factory=list)

    def go_template(self) -> str:
        parts = [_go_literal(self.header), "{{ range .Messages }}"]
        for i, (role, (before, after)) in enumerate(self.turns.items()):
            keyword = "if" if i == 0 else "else if"
            parts.append(f"{{{{ {keyword} eq .Role {json.dumps(role)} }}}}")
            parts += [_go_literal(before), "{{ .Content }}", _go_literal(after)]
        parts += ["{{ end }}{{ end }}", _go_literal(self.generation_prompt)]
        return "".join(parts)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """What the Go template renders for `messages` (the same pieces, joined here)."""
        text = self.header
        for message in messages:
            before, after = self.turns[message["role"]]
            text += before + message["content"] + after
        return text + self.generation_prompt


_PLACEHOLDER = "TUNEFORGEPLACEHOLDER"
_ROLES = ("system", "user", "assistant")


def _go_literal(text: str) -> str:
    """Text as Go template source: as is, or as a quoted string where it holds template syntax."""
    if "{{" in text or "}}" in text or '"""' in text:
        return "{{ " + json.dumps(text) + " }}"
    return text


def ollama_template(tokenizer: PreTrainedTokenizerBase) -> OllamaTemplate:
    """The Go-template pieces that render what the tokenizer's chat template renders."""

    def render(messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert isinstance(text, str)
        return text

    # transformers renders no empty conversation: the header is what one user turn has before its
    # `before` that two user turns do not repeat.
    try:
        one = render([{"role": "user", "content": _PLACEHOLDER}])
        two = render(
            [{"role": "user", "content": f"{_PLACEHOLDER}0"}, {"role": "user", "content": f"{_PLACEHOLDER}1"}]
        )
    except Exception as exc:
        raise TemplateNotDerived(f"the template cannot render user messages: {exc}") from None
    lead, _, after_user = one.partition(_PLACEHOLDER)
    between = two.partition(f"{_PLACEHOLDER}0")[2].partition(f"{_PLACEHOLDER}1")[0]
    if not between.startswith(after_user) or not lead.endswith(between[len(after_user) :]):
        raise TemplateNotDerived("two user messages are not rendered as two user turns")
    header = lead[: len(lead) - len(between) + len(after_user)]
    turns: dict[str, tuple[str, str]] = {}
    for role in _ROLES:
        try:
            text = render([{"role": role, "content": _PLACEHOLDER}])
        except Exception as exc:
            raise TemplateNotDerived(f"the template cannot render a lone {role} message: {exc}") from None
        if not text.startswith(header) or text.count(_PLACEHOLDER) != 1:
            raise TemplateNotDerived(f"a {role} message is not rendered after the template's header")
        before, after = text[len(header) :].split(_PLACEHOLDER)
        turns[role] = (before, after)
    single = render([{"role": "user", "content": _PLACEHOLDER}])
    prompted = render([{"role": "user", "content": _PLACEHOLDER}], generation_prompt=True)
    if not prompted.startswith(single):
        raise TemplateNotDerived("the generation prompt is not appended to the conversation")
    derived = OllamaTemplate(header, turns, prompted[len(single) :])
    conversation = [{"role": role, "content": f"{_PLACEHOLDER}{i}"} for i, role in enumerate(_ROLES * 2)]
    expected = render(conversation, generation_prompt=True)
    if derived.render(conversation) != expected:
        raise TemplateNotDerived("the template renders a conversation other than turn by turn")
    specials = [str(token) for token in tokenizer.all_special_tokens]
    after_assistant = turns["assistant"][1]
    stops = [token for token in specials if token and token in after_assistant]
    eos = tokenizer.eos_token
    if isinstance(eos, str) and eos not in stops:
        stops.append(eos)
    derived.stops = stops
    return derived


def modelfile(template: OllamaTemplate | None, model_id: str, note: str = "") -> str:
    lines = [
        f"# Ollama Modelfile for a Tuneforge fine-tune of {model_id}: `ollama create NAME -f Modelfile`",
        "# in this directory. TEMPLATE and stop tokens come from the chat template it was trained with.",
    ]
    if note:
        lines.append(f"# {note}")
    lines.append(f"FROM ./{GGUF_FILE}")
    if template is not None:
        lines.append(f'TEMPLATE """{template.go_template()}"""')
        lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in template.stops]
    return "\n".join(lines) + "\n"


# --- exporting ---------------------------------------------------------------------------------


@dataclass
class GgufExport:
    directory: Path
    warnings: dict[str, int] = field(default_factory=dict)


def export_gguf(model_dir: Path, out: Path, outtype: str, model_id: str) -> GgufExport:
    """`out`/model.gguf (llama.cpp's converter, `outtype` f16 or q8_0) and `out`/Modelfile from a
    merged (or full) model directory in transformers' layout."""
    from transformers import AutoTokenizer

    if missing := missing_requirements():
        raise GgufError(f"GGUF export needs {', '.join(missing)}: {INSTALL_HINT}")
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "tuneforge.training.gguf",
        "convert",
        str(model_dir),
        str(out / GGUF_FILE),
    ]
    done = subprocess.run(
        [*command, outtype],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    (out.parent / "gguf-convert.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        last = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()][-1:]
        raise GgufError(f"llama.cpp's converter failed: {last[0] if last else done.returncode}")
    result = GgufExport(out)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        template: OllamaTemplate | None = ollama_template(tokenizer)
        note = ""
    except TemplateNotDerived as exc:
        template, note = None, f"No TEMPLATE: {exc}; Ollama falls back to the GGUF's chat template."
        result.warnings["gguf_modelfile_template_not_derived"] = 1
    (out / MODELFILE).write_text(modelfile(template, model_id, note))
    return result


# --- inside the converter's process ------------------------------------------------------------


def known_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json whose hash its converter does not know,
    when its splitting is one llama.cpp implements: byte-level with GPT-2's regex, no normalizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if (
        tokenizer_json.get("normalizer") is None
        and (tokenizer_json.get("model") or {}).get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    ):
        return "gpt-2"
    return None


def _run_converter(model_dir: Path, outfile: Path, outtype: str) -> None:
    """llama.cpp's `convert_hf_to_gguf.main()` with our subclass registered for the architecture."""
    import logging

    root = converter_dir()
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    import convert_hf_to_gguf
    import gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    log = logging.getLogger("tuneforge-gguf")
    hparams = ModelBase.load_hparams(model_dir, False)
    architecture = get_model_architecture(hparams, ModelType.TEXT)
    upstream = get_model_class(architecture)

    class TuneforgeModel(upstream):  # type: ignore[misc, valid-type]
        model_arch = upstream.model_arch  # the converter asks every class to name its own

        def get_vocab_base_pre(self, tokenizer: Any) -> str:
            try:
                return str(super().get_vocab_base_pre(tokenizer))
            except NotImplementedError:
                path = Path(self.dir_model) / "tokenizer.json"
                name = known_pre_tokenizer(json.loads(path.read_text())) if path.is_file() else None
                if name is None:
                    raise
                log.info("tuneforge: unknown tokenizer hash; its tokenizer.json splits as %r", name)
                return name

        def set_vocab(self) -> None:
            super().set_vocab()
            key = gguf.Keys.Tokenizer.CHAT_TEMPLATE
            for kv_data in self.gguf_writer.kv_data:
                value = kv_data.get(key)
                if value is not None and isinstance(value.value, str):
                    stripped = GENERATION_TAGS.sub("", value.value)
                    self.gguf_writer.remove_key(key)
                    self.gguf_writer.add_chat_template(stripped)
                    break

    ModelBase.register(architecture)(TuneforgeModel)
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    convert_hf_to_gguf.main()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["install-converter"] and len(args) <= 2:
        print(install_converter(archive=Path(args[1]) if len(args) > 1 else None))
        return 0
    if args[:1] == ["convert"] and len(args) == 4:
        _run_converter(Path(args[1]), Path(args[2]), args[3])
        return 0
    print(
        "usage: python -m tuneforge.training.gguf install-converter [SDIST]"
        " | convert MODEL_DIR OUTFILE OUTTYPE"
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""Small hostile inputs for every loader, and a runner that measures what each costs.

Every case writes its files (a few KB to a few MB) into a folder and returns the command that must refuse them
with one ``error:`` line: exit 1 (exit 2 with argparse's usage for a bad flag value), no traceback, quickly and
in little memory. The loaders: checkpoints (sample.py, train.py --resume), translators, PyTorch checkpoints and
nanoGPT's meta.pkl (convert_torch_ckpt.py), --vocab_from texts, prompt files, JSON --config files, and the flags.

``tests/test_hostile.py`` runs every case under pytest; ``python tests/hostile_inputs.py`` runs them all and prints
each case's wall time and peak RSS.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the project's mlx_gpt, not an installed one
    sys.path.insert(0, str(ROOT))

import mlx_gpt  # noqa: E402, F401  (before mlx.core)
from mlx_gpt.checkpoint import Checkpoint, arrays_checksum  # noqa: E402
from mlx_gpt.config import GPTConfig  # noqa: E402
from mlx_gpt.tokenizer import CharTokenizer  # noqa: E402

VOCAB = "abcdefgh \n"
TEXT = VOCAB * 40
LOAD_TRANSLATOR = ("import sys; from mlx_gpt import cli; from mlx_gpt.seq2seq.checkpoint import load_translator; "
                   "cli.run(lambda: load_translator(sys.argv[1]))")


@dataclass
class Case:
    """A command (the arguments after ``python``) and what its one error line must say."""

    argv: list[str]
    expect: str
    code: int = 1  # 2: argparse refused a flag value (usage line, then the error line)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int  # bytes; -1 when unknown


CASES: dict[str, Callable[[Path], Case]] = {}


def case(name: str) -> Callable[[Callable[[Path], Case]], Callable[[Path], Case]]:
    def register(make: Callable[[Path], Case]) -> Callable[[Path], Case]:
        CASES[name] = make
        return make

    return register


# Linux counts a process's peak RSS from before its exec, so a child of this (large) process would report this
# process's size: a small launcher runs the command and reports its child's peak instead.
LAUNCHER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
            "sys.exit(code)")


def run_case(command: Case, folder: Path, timeout: float = 120.0) -> Result:
    """Run the command in the project folder: its output, exit code, wall time and peak RSS."""
    report = folder / ".peak_rss_kib"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(report), sys.executable, *command.argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher and the command
        out, err = proc.communicate()
    seconds = time.perf_counter() - start
    peak = int(report.read_text()) * 1024 if report.exists() else -1
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), seconds, peak)


def check_result(name: str, command: Case, result: Result) -> list[str]:
    """What is wrong with a result (empty when the case was refused as it must be)."""
    problems = []
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.code != command.code:
        problems.append(f"exit code {result.code}, expected {command.code}")
    if "Traceback" in result.stderr or "error: unexpected " in result.stderr:  # how cli.run reports a bug
        problems.append("a traceback or an unexpected error")
    if command.code == 1 and (len(lines) != 1 or not lines[0].startswith("error: ")):
        problems.append("not one 'error:' line")
    if command.code == 2 and (not lines or ": error: argument " not in lines[-1]):
        problems.append("not argparse's error line")
    if command.expect not in (lines[-1] if lines else ""):
        problems.append(f"the error does not say {command.expect!r}")
    return [f"{name}: {p}: {result.stderr.strip()[:300]!r}" for p in problems]


# ----------------------------------------------------------------------------- building blocks


def gpt_checkpoint(path: Path, n_layer: int = 1, n_embd: int = 8, zeros: bool = False) -> Path:
    """A valid tiny checkpoint (random or zero weights)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_gpt.model import GPT

    tok = CharTokenizer.from_text(VOCAB)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=n_layer, n_head=2, n_embd=n_embd, dropout=0.0)
    mx.random.seed(0)
    params = tree_flatten(GPT(cfg).parameters())
    weights = {k: np.zeros(v.shape, np.float32) if zeros else np.array(v) for k, v in params}
    return Checkpoint(config=cfg, tokenizer=tok, model=weights, iter=5, best_val_loss=2.0).save(path)


def npz_arrays(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return json.loads(arrays.pop("meta").tobytes()), arrays


def npz_write(path: Path, meta: object, arrays: dict[str, np.ndarray], fix_checksum: bool = True) -> Path:
    """An npz of ``arrays`` and ``meta`` (JSON, or raw bytes), with a matching checksum unless told otherwise."""
    if isinstance(meta, dict) and fix_checksum:
        meta = {**meta, "checksum": arrays_checksum(arrays)}
    payload = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    np.savez(path, **arrays, meta=np.frombuffer(payload, dtype=np.uint8))
    return path


def edited(path: Path, change_meta: Callable[[dict], object] | None = None,
           arrays: dict[str, np.ndarray] | None = None) -> Path:
    """Re-save a checkpoint with its header changed and/or arrays replaced (the checksum made to match)."""
    meta, current = npz_arrays(path)
    if change_meta:
        change_meta(meta)
    current.update(arrays or {})
    return npz_write(path, meta, current)


def zero_bomb(path: Path, meta: dict, shapes: dict[str, tuple[int, ...]]) -> Path:
    """An npz whose float32 zero arrays (of the given shapes) are deflated: a few KB per 10 MB declared."""
    arrays = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}  # lazy pages: zeros cost no RSS
    meta = {**meta, "checksum": arrays_checksum(arrays)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in {**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array)
    return path


def mlx_shapes(config: object, model_class: type) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of a model built lazily (MLX allocates nothing until evaluated)."""
    from mlx.utils import tree_flatten

    return {k: tuple(v.shape) for k, v in tree_flatten(model_class(config).parameters())}


def translator(path: Path) -> Path:
    from mlx_gpt.seq2seq import Seq2Seq, Seq2SeqConfig, SpecialCharTokenizer
    from mlx_gpt.seq2seq.checkpoint import save_translator

    cfg = Seq2SeqConfig(src_vocab_size=13, tgt_vocab_size=11, src_block_size=16, tgt_block_size=12,
                        n_encoder_layer=2, n_decoder_layer=2, n_head=2, n_embd=16)
    return save_translator(path, Seq2Seq(cfg), SpecialCharTokenizer.from_text("abcdefghij"),
                           SpecialCharTokenizer.from_text("01234567"))


def text_file(folder: Path) -> Path:
    path = folder / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def sample(ckpt: Path | str, *args: str) -> list[str]:
    return ["sample.py", "--ckpt", str(ckpt), "--device", "cpu", "--max_new_tokens", "3", *args]


def resume(folder: Path, ckpt: Path) -> list[str]:
    return ["train.py", "--resume", "--ckpt", str(ckpt), "--data", str(text_file(folder)), "--out_dir",
            str(folder / "out"), "--device", "cpu", "--max_iters", "10"]


def convert(folder: Path, source: Path | str, *args: str) -> list[str]:
    return ["convert_torch_ckpt.py", str(source), str(folder / "out.npz"), *args]


# ----------------------------------------------------------------------------- checkpoints (.npz)


@case("ckpt_zip_bomb")
def _(folder: Path) -> Case:
    """~250 MB of zero weights of a consistent 63M-parameter model, deflated to ~250 KB."""
    from mlx_gpt.model import GPT

    tok = CharTokenizer.from_text(VOCAB)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=5, n_head=2, n_embd=1024, dropout=0.0)
    meta = {"format": "mlx-gpt", "version": 1, "config": cfg.to_dict(), "vocab": tok.chars, "iter": 0}
    shapes = {f"model/{k}": v for k, v in mlx_shapes(cfg, GPT).items()}
    return Case(sample(zero_bomb(folder / "bomb.npz", meta, shapes)), "more than 8 times the file's")


@case("resume_zip_bomb")
def _(folder: Path) -> Case:
    bomb = CASES["ckpt_zip_bomb"](folder).argv[2]
    return Case(resume(folder, Path(bomb)), "more than 8 times the file's")


@case("ckpt_vocab_million")
def _(folder: Path) -> Case:
    """A million-character vocabulary: its header alone is over the size cap."""
    path = gpt_checkpoint(folder / "c.npz")
    meta, arrays = npz_arrays(path)
    meta["vocab"] = [chr(0x10000 + i) for i in range(10**6)]
    meta["config"]["vocab_size"] = 10**6
    payload = json.dumps({**meta, "checksum": arrays_checksum(arrays)}, ensure_ascii=False).encode()
    return Case(sample(npz_write(path, payload, arrays)), "more than the limit of 4,194,304")


@case("ckpt_vocab_over_cap")
def _(folder: Path) -> Case:
    path = edited(gpt_checkpoint(folder / "c.npz"),
                  lambda m: m.update(vocab=[chr(0x10000 + i) for i in range(70_000)]))
    return Case(sample(path), "the vocabulary has 70000 characters, more than the limit of 65536")


@case("ckpt_meta_deep_json")
def _(folder: Path) -> Case:
    _, arrays = npz_arrays(gpt_checkpoint(folder / "c.npz"))
    path = npz_write(folder / "c.npz", b"[" * 100_000 + b"]" * 100_000, arrays)
    return Case(sample(path), "its header nests 100000 levels deep, more than the limit of 32")


@case("ckpt_int64_weights")
def _(folder: Path) -> Case:
    path = edited(gpt_checkpoint(folder / "c.npz"), arrays={"model/wte.weight": np.ones((10, 8), np.int64)})
    return Case(sample(path), "model/wte.weight has dtype int64 but must hold floats")


@case("ckpt_bool_weights")
def _(folder: Path) -> Case:
    path = edited(gpt_checkpoint(folder / "c.npz"), arrays={"model/h.0.attn.c_proj.weight": np.ones((8, 8), bool)})
    return Case(sample(path), "model/h.0.attn.c_proj.weight has dtype bool but must hold floats")


def _with_value(folder: Path, value: float) -> Path:
    path = gpt_checkpoint(folder / "c.npz")
    weight = npz_arrays(path)[1]["model/h.0.mlp.c_fc.weight"].copy()
    weight[1, 1] = value
    return edited(path, arrays={"model/h.0.mlp.c_fc.weight": weight})


@case("ckpt_nan_weights")
def _(folder: Path) -> Case:
    return Case(sample(_with_value(folder, np.nan)), "non-finite weights in model/h.0.mlp.c_fc.weight")


@case("resume_inf_weights")
def _(folder: Path) -> Case:
    return Case(resume(folder, _with_value(folder, np.inf)), "non-finite weights in model/h.0.mlp.c_fc.weight")


@case("resume_train_unknown_keys")
def _(folder: Path) -> Case:
    path = edited(gpt_checkpoint(folder / "c.npz"), lambda m: m.update(train={"batchsize": 8, "max_iters": 10}))
    return Case(resume(folder, path), "'train' has keys that are not TrainConfig fields: batchsize")


@case("resume_best_val_loss_nan")
def _(folder: Path) -> Case:
    path = edited(gpt_checkpoint(folder / "c.npz"), lambda m: m.update(best_val_loss=float("nan")))
    return Case(resume(folder, path), "'best_val_loss' must be a finite number or null, got nan")


@case("ckpt_directory")
def _(folder: Path) -> Case:
    (folder / "c.npz").mkdir()
    return Case(sample(folder / "c.npz"), "is a folder, not a file")


@case("ckpt_fifo")
def _(folder: Path) -> Case:
    return Case(sample(fifo(folder / "c.npz")), "is not a regular file (a FIFO, device or socket)")


@case("ckpt_dev_zero")
def _(folder: Path) -> Case:
    return Case(sample("/dev/zero"), "is not a regular file (a FIFO, device or socket)")


@case("ckpt_symlink_loop")
def _(folder: Path) -> Case:
    (folder / "a.npz").symlink_to(folder / "b.npz")
    (folder / "b.npz").symlink_to(folder / "a.npz")
    return Case(sample(folder / "a.npz"), "is a symlink loop")


@case("ckpt_text_file")
def _(folder: Path) -> Case:
    (folder / "c.npz").write_text("just some text\n" * 100)
    return Case(sample(folder / "c.npz"), "not an .npz file (no readable zip archive")


@case("ckpt_random_bytes")
def _(folder: Path) -> Case:
    (folder / "c.npz").write_bytes(np.random.default_rng(0).bytes(100_000))
    return Case(sample(folder / "c.npz"), "not an .npz file")


@case("ckpt_n_layer_1e9")
def _(folder: Path) -> Case:
    path = edited(gpt_checkpoint(folder / "c.npz"), lambda m: m["config"].update(n_layer=10**9))
    return Case(sample(path), "config.n_layer is 1000000000 but the weights hold 1 h.N layers")


@case("ckpt_npy_shape_2_45")
def _(folder: Path) -> Case:
    path = gpt_checkpoint(folder / "c.npz")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**45,)})
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("ema/wte.weight.npy", header.getvalue() + b"\0" * 64)
    return Case(sample(path), "ema/wte.weight declares")


@case("ckpt_pickled_object")
def _(folder: Path) -> Case:
    path = gpt_checkpoint(folder / "c.npz")
    with zipfile.ZipFile(path, "a") as zf, zf.open("model/evil.npy", "w") as f:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return Case(sample(path), "model/evil holds pickled Python objects, which are never loaded")


@case("ckpt_lone_surrogate")
def _(folder: Path) -> Case:
    path = edited(gpt_checkpoint(folder / "c.npz"), lambda m: m["vocab"].__setitem__(-1, "\ud800"))
    return Case(sample(path), "lone surrogate")


# ----------------------------------------------------------------------------- translators (.npz)


def load_translator(path: Path | str) -> list[str]:
    return ["-c", LOAD_TRANSLATOR, str(path)]


@case("s2s_zip_bomb")
def _(folder: Path) -> Case:
    from mlx_gpt.seq2seq import Seq2Seq, Seq2SeqConfig

    cfg = Seq2SeqConfig(src_vocab_size=13, tgt_vocab_size=11, n_encoder_layer=3, n_decoder_layer=3, n_head=2,
                        n_embd=1024)
    src = {"type": "char+specials", "specials": ["<pad>", "<bos>", "<eos>"], "chars": list("abcdefghij")}
    meta = {"format": "mlx-gpt-seq2seq", "version": 1, "config": cfg.to_dict(), "src_tokenizer": src,
            "tgt_tokenizer": {**src, "chars": list("01234567")}, "info": {}}
    shapes = {f"model/{k}": v for k, v in mlx_shapes(cfg, Seq2Seq).items()}
    return Case(load_translator(zero_bomb(folder / "t.npz", meta, shapes)), "more than 8 times the file's")


@case("s2s_n_encoder_layer_1e9")
def _(folder: Path) -> Case:
    path = edited(translator(folder / "t.npz"), lambda m: m["config"].update(n_encoder_layer=10**9))
    return Case(load_translator(path), "n_layer is 1000000000 but the weights hold 2 encoder.h.N layers")


@case("s2s_meta_deep_json")
def _(folder: Path) -> Case:
    _, arrays = npz_arrays(translator(folder / "t.npz"))
    path = npz_write(folder / "t.npz", b"{\"a\": " * 50_000, arrays)
    return Case(load_translator(path), "its header nests 50000 levels deep")


@case("s2s_int_weights")
def _(folder: Path) -> Case:
    path = translator(folder / "t.npz")
    meta, arrays = npz_arrays(path)
    arrays["model/encoder.wte.weight"] = arrays["model/encoder.wte.weight"].astype(np.int8)
    return Case(load_translator(npz_write(path, meta, arrays)), "has dtype int8 but must hold floats")


@case("s2s_nan_weights")
def _(folder: Path) -> Case:
    path = translator(folder / "t.npz")
    meta, arrays = npz_arrays(path)
    arrays["model/decoder.ln_f.weight"] = np.full_like(arrays["model/decoder.ln_f.weight"], np.nan)
    return Case(load_translator(npz_write(path, meta, arrays)), "non-finite weights in model/decoder.ln_f.weight")


@case("s2s_fifo")
def _(folder: Path) -> Case:
    return Case(load_translator(fifo(folder / "t.npz")), "is not a regular file")


# ----------------------------------------------------------------------------- PyTorch checkpoints (.pt)


def nanogpt_shapes(V: int = 10, T: int = 8, C: int = 8, L: int = 2) -> dict[str, tuple[int, ...]]:
    """nanoGPT's state_dict names and shapes (no biases; the head is tied to wte)."""
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C), "transformer.ln_f.weight": (C,)}
    for i in range(L):
        b = f"transformer.h.{i}."
        shapes |= {f"{b}ln_1.weight": (C,), f"{b}ln_2.weight": (C,), f"{b}attn.c_attn.weight": (3 * C, C),
                   f"{b}attn.c_proj.weight": (C, C), f"{b}mlp.c_fc.weight": (4 * C, C),
                   f"{b}mlp.c_proj.weight": (C, 4 * C)}
    return shapes


def nanogpt_state(V: int = 10, T: int = 8, C: int = 8, L: int = 2) -> dict:
    """A nanoGPT state_dict with random weights and the head tied to wte (one storage, as nanoGPT saves it)."""
    import torch

    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) for k, shape in nanogpt_shapes(V, T, C, L).items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def nanogpt_file(path: Path, state: dict, **model_args: object) -> Path:
    import torch

    C = state["transformer.wte.weight"].shape[1]
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.h.")})
    args = {"n_layer": layers, "n_head": 2, "n_embd": C, "block_size": 8, "bias": False, "vocab_size": 10,
            "dropout": 0.0, **model_args}
    torch.save({"model": state, "model_args": args, "iter_num": 3, "config": {"dataset": "x"}}, path)
    return path


def vocab(folder: Path) -> list[str]:
    return ["--vocab_from", str(text_file(folder))]


@case("pt_nanogpt_n_layer_1e9")
def _(folder: Path) -> Case:
    path = nanogpt_file(folder / "ckpt.pt", nanogpt_state(), n_layer=10**9)
    return Case(convert(folder, path, *vocab(folder)), "model_args.n_layer is 1000000000 but the state_dict holds 2")


@case("pt_expand_30000_extra_key")
def _(folder: Path) -> Case:
    """The issue's 77 KB file: a stride-0 expand(30000, 30000) beside the weights."""
    import torch

    state = nanogpt_state() | {"extra.weight": torch.zeros(1).expand(30000, 30000)}
    return Case(convert(folder, nanogpt_file(folder / "ckpt.pt", state), *vocab(folder)),
                "unexpected keys: extra.weight")


@case("pt_expand_as_weights")
def _(folder: Path) -> Case:
    """Every weight a stride-0 expand of the right shape: 2.4 GB of float32 from a few KB."""
    import torch

    state = {k: torch.zeros(1).expand(*shape) for k, shape in nanogpt_shapes(V=10, T=8, C=4096, L=1).items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return Case(convert(folder, nanogpt_file(folder / "ckpt.pt", state), *vocab(folder)),
                "repeats its data (stride 0, e.g. an expand)")


@case("pt_1000_refs_extra_keys")
def _(folder: Path) -> Case:
    """The issue's 1000 references to one 4 MB tensor."""
    import torch

    shared = torch.zeros(1024, 1024)
    state = nanogpt_state() | {f"extra.{i}": shared for i in range(1000)}
    return Case(convert(folder, nanogpt_file(folder / "ckpt.pt", state), *vocab(folder)), "unexpected keys: extra.0")


@case("pt_layers_share_one_storage")
def _(folder: Path) -> Case:
    """100 layers that all are layer 0 (3 MB stored, 300 MB once copied out)."""
    state = nanogpt_state(C=256, L=1)
    for i in range(1, 100):
        state |= {k.replace("h.0.", f"h.{i}."): v for k, v in state.items() if k.startswith("transformer.h.0.")}
    return Case(convert(folder, nanogpt_file(folder / "ckpt.pt", state), *vocab(folder)),
                "(many tensors share one storage)")


@case("pt_int_weights")
def _(folder: Path) -> Case:
    import torch

    state = nanogpt_state() | {"transformer.wpe.weight": torch.ones(8, 8, dtype=torch.int64)}
    return Case(convert(folder, nanogpt_file(folder / "ckpt.pt", state), *vocab(folder)),
                "transformer.wpe.weight has dtype torch.int64; weights are floating point")


@case("pt_nan_weights")
def _(folder: Path) -> Case:
    state = nanogpt_state()
    state["transformer.h.1.mlp.c_fc.weight"][0, 0] = float("nan")
    return Case(convert(folder, nanogpt_file(folder / "ckpt.pt", state), *vocab(folder)),
                "non-finite weights in transformer.h.1.mlp.c_fc.weight")


@case("pt_minigpt_head_1e9")
def _(folder: Path) -> Case:
    import torch

    state = {"token_embedding_table.weight": torch.zeros(10, 8), "position_embedding_table.weight": torch.zeros(8, 8),
             "blocks.0.sa.heads.999999999.key.weight": torch.zeros(4, 8)}
    torch.save({"model_state_dict": state, "meta": {"chars": list(VOCAB)}, "iter": 1}, folder / "ckpt.pt")
    return Case(convert(folder, folder / "ckpt.pt"), "heads of blocks.0 are numbered up to 999999999 but there are 1")


@case("pt_deflated_record")
def _(folder: Path) -> Case:
    """A torch zip whose 64 MB tensor record is deflated (torch would inflate it in memory without mmap)."""
    import torch

    state = nanogpt_state() | {"big": torch.zeros(16 * 2**20)}
    plain = nanogpt_file(folder / "plain.pt", state)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(folder / "ckpt.pt", "w") as dst:
        for info in src.infolist():
            deflate = "/data/" in info.filename and info.file_size > 2**20
            dst.writestr(info.filename, src.read(info), zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    plain.unlink()
    return Case(convert(folder, folder / "ckpt.pt", *vocab(folder)), "not a PyTorch checkpoint torch.load can read")


@case("pt_fifo")
def _(folder: Path) -> Case:
    return Case(convert(folder, fifo(folder / "ckpt.pt")), "is not a regular file")


@case("pt_dev_zero")
def _(folder: Path) -> Case:
    return Case(convert(folder, "/dev/zero"), "is not a regular file")


# ----------------------------------------------------------------------------- meta.pkl and --vocab_from


def meta_pkl(folder: Path, value: object) -> list[str]:
    path = folder / "meta.pkl"
    path.write_bytes(pickle.dumps(value))
    return convert(folder, nanogpt_file(folder / "ckpt.pt", nanogpt_state()), "--meta", str(path))


def laughs(depth: int, width: int) -> dict:
    """Dicts nested ``depth`` deep, each holding the one below ``width`` times (pickled once each, by the memo)."""
    value: object = "lol"
    for _ in range(depth):
        value = {f"k{i}": value for i in range(width)}
    return {"vocab_size": 1, "itos": {0: "a"}, "laughs": value}


@case("meta_billion_laughs")
def _(folder: Path) -> Case:
    return Case(meta_pkl(folder, laughs(40, 2)), "it nests more than 8 levels deep")


@case("meta_wide_laughs")
def _(folder: Path) -> Case:
    return Case(meta_pkl(folder, laughs(3, 200)), "more than 1,048,576 values")


@case("meta_self_reference")
def _(folder: Path) -> Case:
    value: dict = {"vocab_size": 1, "itos": {0: "a"}}
    value["self"] = value
    return Case(meta_pkl(folder, value), "it nests more than 8 levels deep")


@case("meta_dev_zero")
def _(folder: Path) -> Case:
    return Case(convert(folder, nanogpt_file(folder / "ckpt.pt", nanogpt_state()), "--meta", "/dev/zero"),
                "cannot read --meta /dev/zero: it is not a regular file")


@case("meta_fifo")
def _(folder: Path) -> Case:
    return Case(convert(folder, nanogpt_file(folder / "ckpt.pt", nanogpt_state()), "--meta",
                        str(fifo(folder / "meta.pkl"))), "is not a regular file")


@case("vocab_from_dev_zero")
def _(folder: Path) -> Case:
    return Case(convert(folder, nanogpt_file(folder / "ckpt.pt", nanogpt_state()), "--vocab_from", "/dev/zero"),
                "cannot read --vocab_from /dev/zero: it is not a regular file")


# ----------------------------------------------------------------------------- prompt files


@case("prompt_dev_zero")
def _(folder: Path) -> Case:
    return Case(sample(gpt_checkpoint(folder / "c.npz"), "--prompt", "FILE:/dev/zero"),
                "cannot read prompt file /dev/zero: it is not a regular file")


@case("prompt_fifo")
def _(folder: Path) -> Case:
    return Case(sample(gpt_checkpoint(folder / "c.npz"), "--prompt", f"FILE:{fifo(folder / 'p.txt')}"),
                "is not a regular file")


@case("prompt_over_1mib")
def _(folder: Path) -> Case:
    (folder / "p.txt").write_text("a" * (2**20 + 1))
    return Case(sample(gpt_checkpoint(folder / "c.npz"), "--prompt", f"FILE:{folder / 'p.txt'}"),
                "is larger than the limit of 1,048,576 bytes")


@case("prompt_not_utf8")
def _(folder: Path) -> Case:
    (folder / "p.txt").write_bytes(b"caf\xe9")
    return Case(sample(gpt_checkpoint(folder / "c.npz"), "--prompt", f"FILE:{folder / 'p.txt'}"),
                "it is not UTF-8 text (bad byte at offset 3)")


# ----------------------------------------------------------------------------- flags


@case("flag_num_samples_1e6")
def _(folder: Path) -> Case:
    return Case(sample(gpt_checkpoint(folder / "c.npz"), "--num_samples", "1000000"),
                "must be at most 1,024 (the limit), got 1000000", code=2)


@case("flag_max_new_tokens_2_31")
def _(folder: Path) -> Case:
    return Case(sample(gpt_checkpoint(folder / "c.npz"), "--max_new_tokens", str(2**31)),
                "must be at most 1,000,000 (the limit)", code=2)


@case("flag_repetition_context_1e12")
def _(folder: Path) -> Case:
    return Case(sample(gpt_checkpoint(folder / "c.npz"), "--repetition_penalty", "1.2",
                       "--repetition_context_size", str(10**12)), "must be at most 1,000,000 (the limit)", code=2)


@case("flag_samples_times_tokens")
def _(folder: Path) -> Case:
    return Case(sample(gpt_checkpoint(folder / "c.npz"), "--num_samples", "1024", "--max_new_tokens", "1000000"),
                "more than the limit of 33,554,432")


@case("flag_seed_negative_sample")
def _(folder: Path) -> Case:
    return Case(sample(gpt_checkpoint(folder / "c.npz"), "--seed", "-1"), "must be in [0, 2**64), got -1", code=2)


@case("flag_seed_2_64_train")
def _(folder: Path) -> Case:
    return Case(["train.py", "--data", str(text_file(folder)), "--seed", str(2**64)], "must be in [0, 2**64)", code=2)


@case("flag_seed_negative_seq2seq")
def _(folder: Path) -> Case:
    return Case(["-m", "mlx_gpt.seq2seq", "--seed", "-1"], "must be in [0, 2**64), got -1", code=2)


@case("seq2seq_out_is_a_folder")
def _(folder: Path) -> Case:
    return Case(["-m", "mlx_gpt.seq2seq", "--out", str(folder), "--device", "cpu"],
                f"--out {folder} is a folder")


# ----------------------------------------------------------------------------- JSON --config files


def train_config(folder: Path, payload: bytes) -> list[str]:
    (folder / "config.json").write_bytes(payload)
    return ["train.py", "--config", str(folder / "config.json"), "--data", str(text_file(folder)), "--out_dir",
            str(folder / "out"), "--device", "cpu"]


@case("config_seed_negative")
def _(folder: Path) -> Case:
    return Case(train_config(folder, b'{"seed": -1}'), "seed must be in [0, 2**64)")


@case("config_seed_2_64")
def _(folder: Path) -> Case:
    return Case(train_config(folder, json.dumps({"seed": 2**64}).encode()), "seed must be in [0, 2**64)")


@case("config_deep_json")
def _(folder: Path) -> Case:
    return Case(train_config(folder, b"[" * 100_000), "nests 100000 levels deep")


@case("config_dev_zero")
def _(folder: Path) -> Case:
    return Case(["train.py", "--config", "/dev/zero", "--data", str(text_file(folder)), "--device", "cpu"],
                "cannot read --config /dev/zero: it is not a regular file")


# ----------------------------------------------------------------------------- run them all


def main(argv: list[str]) -> int:
    """Run every case (or those named) in a fresh folder; print wall time and peak RSS per case."""
    import tempfile

    names = argv or list(CASES)
    failures, worst_seconds, worst_rss = [], (0.0, ""), (0, "")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = Path(tmp) / name
            folder.mkdir()
            command = CASES[name](folder)
            result = run_case(command, folder)
            failures += check_result(name, command, result)
            worst_seconds = max(worst_seconds, (result.seconds, name))
            worst_rss = max(worst_rss, (result.peak_rss, name))
            print(f"{name:32} exit {result.code}  {result.seconds:6.2f} s  {result.peak_rss / 2**20:7.1f} MiB",
                  flush=True)
    print(f"{len(names)} cases; max {worst_seconds[0]:.2f} s ({worst_seconds[1]}), "
          f"max peak RSS {worst_rss[0] / 2**20:.1f} MiB ({worst_rss[1]})")
    print("\n".join(failures) or "every case refused in one line")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

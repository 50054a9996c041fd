"""Hugging Face safetensors in and out of the parallelized model, without the whole model on any rank.

Load (checkpoint.initial_load_in_hf): torch DCP's HuggingFaceStorageReader reads, on each rank, only
the rows/columns of each tensor that the rank's DTensor shard holds (safetensors slices), converting
the file's dtype (bf16) into the fp32 parameters in place. Names map through models/hf.py.
HF's q_proj/k_proj rows are permuted within each head (rotate-half RoPE): those two tensors per block
are read into a buffer of the same sharding in HF's row order, then permuted into the parameter.
When every rank's shard holds whole heads (the usual case: heads divisible by the shard count) the
permutation is local; otherwise the tensor is gathered, permuted and re-sharded, one at a time.
Peak memory per rank: its shard of the model, its shard of the q/k buffers, one full q/k tensor in
the gather case, and the mapped file pages of the slices it reads.

Export (checkpoint.last_save_in_hf): every rank writes its shards (HuggingFaceStorageWriter,
distributed) to <out>/sharded/, then the ranks consolidate them into model-0000K-of-0000M.safetensors
files (each output file by one rank, one tensor in memory at a time) with the index; rank 0 writes
config.json (the run's RoPE, max_position_embeddings raised to the trained seq_len),
generation_config.json and the tokenizer files of model.hf_assets_path. The folder appears under its
name (step-N-hf) only when complete; checkpoint resume ignores it (not a step-N name).

The checks before launch read only the safetensors headers (check_initial_weights).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files_on_every_rank
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from torchtitan_sp.config import Config, ConfigError, resolve_repo_path
from torchtitan_sp.models.hf import hf_config, hf_key, permute_rows, unpermute_rows
from torchtitan_sp.models.llama3 import ModelArgs, Transformer
from torchtitan_sp.models.shape import model_args

logger = logging.getLogger("torchtitan_sp")

INDEX = "model.safetensors.index.json"
MAX_FILE_BYTES = 5 * 2**30  # safetensors file size of the export (save_pretrained's classic default)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "original/tokenizer.model")
FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
QK = ("attention.wq.weight", "attention.wk.weight")  # rows permuted within each head in HF files


# ---- before launch ------------------------------------------------------------------------------

def check_hf_keys(cfg: Config) -> None:
    """Keys of [checkpoint] that the rest of the config makes meaningless."""
    ck = cfg.checkpoint
    if ck.initial_load_in_hf and not ck.initial_load_path:
        raise ConfigError("checkpoint.initial_load_in_hf: needs checkpoint.initial_load_path (a Hugging Face folder "
                          "of safetensors)")
    if ck.export_dtype != "float32" and not ck.last_save_in_hf:
        raise ConfigError(f"checkpoint.export_dtype: {ck.export_dtype!r} has no effect without "
                          "checkpoint.last_save_in_hf = true")


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def _header(path: Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", ...} of a safetensors file, from its JSON header alone."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint.initial_load_path: {path} is not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


def hf_shapes(folder: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) over every safetensors file of the folder, which the index (if any) must match."""
    found: dict[str, tuple[list[int], str]] = {}
    where: dict[str, str] = {}
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"checkpoint.initial_load_path: {index}: not a safetensors index ({e!r})") from None
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ValueError(f"checkpoint.initial_load_path: {index} names {missing[0]}, which is not in {folder}")
    for path in safetensors_files(folder):
        for name, info in _header(path).items():
            if name in where:
                raise ValueError(f"checkpoint.initial_load_path: {name} is in both {where[name]} and {path.name} "
                                 f"(one safetensors set per folder)")
            where[name] = path.name
            found[name] = (list(info["shape"]), info["dtype"])
    return found


def expected_hf_shapes(args: ModelArgs) -> dict[str, list[int]]:
    """HF name -> shape of every tensor a Hugging Face folder of this model holds."""
    with torch.device("meta"):
        model = Transformer(args)
    return {hf_key(k): list(v.shape) for k, v in model.state_dict().items()
            if not (args.tie_word_embeddings and k == "output.weight")}


def check_hf_weights(folder: Path, args: ModelArgs, what: str) -> None:
    """The folder holds exactly this model's tensors (names, shapes, a float dtype); `what` names the model."""
    key = "checkpoint.initial_load_path"
    if not folder.is_dir():
        raise ValueError(f"{key}: {folder} is not a folder (initial_load_in_hf reads a Hugging Face model folder)")
    if not safetensors_files(folder):
        raise ValueError(f"{key}: {folder} has no *.safetensors files (model.safetensors, or "
                         f"model-0000N-of-0000M.safetensors with {INDEX})")
    have, want = hf_shapes(folder), expected_hf_shapes(args)
    for name, shape in want.items():
        if name not in have:
            raise ValueError(f"{key}: {folder} has no {name} ({shape} in {what})")
        if have[name][0] != shape:
            raise ValueError(f"{key}: {folder}: {name} is {have[name][0]} there, {shape} in {what}")
        if have[name][1] not in FLOAT_DTYPES:
            raise ValueError(f"{key}: {folder}: {name} is {have[name][1]}; valid: {' | '.join(FLOAT_DTYPES)}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"{key}: {folder}: unexpected key {extra[0]} ({len(extra)} in all), not a tensor of {what}")


def check_model_pt(path: Path, args: ModelArgs, what: str) -> None:
    """An exported model.pt holds exactly this model's parameters (read memory-mapped: no data loaded)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch.load raises many types for a file that is not a torch.save zip
        raise ValueError(f"checkpoint.initial_load_path: {path} is not a model.pt of export_final "
                         f"({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint.initial_load_path: {path} holds a {type(saved).__name__}, not a state dict")
    with torch.device("meta"):
        want = {k: list(v.shape) for k, v in Transformer(args).state_dict().items()}
    have = {k: list(v.shape) if isinstance(v, torch.Tensor) else None for k, v in saved.items()}
    differ = [k for k in want if want[k] != have.get(k)] + [k for k in have if k not in want]
    if differ:
        k = differ[0]
        raise ValueError(f"checkpoint.initial_load_path: {path} holds another model than {what}: {k} is "
                         f"{have[k] if k in have else 'absent'} there, {want[k] if k in want else 'absent'} here")


def check_initial_weights(cfg: Config, path: Path) -> bool:
    """Check initial_load_path when it is a HF folder or a model.pt (True); False: a DCP folder, the
    caller's to check. A folder of safetensors without initial_load_in_hf is an error, and the reverse."""
    ck, m = cfg.checkpoint, cfg.model
    args = model_args(m)
    what = f"model.flavor {m.flavor!r}" + (f" ({m.hf_assets_path})" if m.flavor == "hf" else "") + \
        (f" with model.n_layers {m.n_layers}" if m.n_layers else "")
    if ck.initial_load_in_hf:
        check_hf_weights(path, args, what)
        return True
    if path.is_file():
        check_model_pt(path, args, what)
        return True
    if path.is_dir() and safetensors_files(path):
        raise ValueError(f"checkpoint.initial_load_path: {path} holds safetensors (a Hugging Face folder); "
                         "set checkpoint.initial_load_in_hf = true")
    return False


# ---- q/k rows ------------------------------------------------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _whole_heads(t: torch.Tensor, head_dim: int) -> bool:
    """This rank's rows of a (heads * head_dim, dim) tensor are whole heads."""
    if not isinstance(t, DTensor):
        return True
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return shape[0] % head_dim == 0 and (shape[0] == 0 or offset[0] % head_dim == 0)


def _permute_into(pairs: list[tuple[torch.Tensor, torch.Tensor]], fn: Callable, head_dim: int) -> None:
    """dst = fn(src, heads) for each (src, dst) of the same global shape and sharding. Local when
    every rank holds whole heads of every tensor (agreed over all ranks); else each tensor in turn is
    gathered, permuted and re-sharded."""
    device = _local(pairs[0][0]).device  # the default group's: NCCL takes CUDA tensors only
    whole = torch.tensor([all(_whole_heads(src, head_dim) for src, _ in pairs)], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(whole, op=dist.ReduceOp.MIN)
    for src, dst in pairs:
        if whole.item():
            local = _local(src)
            _local(dst).copy_(fn(local, local.shape[0] // head_dim))
        else:
            full = src.full_tensor() if isinstance(src, DTensor) else src
            out = fn(full, full.shape[0] // head_dim)
            if isinstance(dst, DTensor):
                out = distribute_tensor(out, dst.device_mesh, dst.placements, src_data_rank=None).to_local()
            _local(dst).copy_(out)
            del full, out


def _hf_named(model: nn.Module, args: ModelArgs) -> list[tuple[str, str, torch.Tensor]]:
    """(our name, HF name, tensor) of the model's state dict (a tied output is the embedding: skipped)."""
    sd = get_model_state_dict(model)
    return [(k, hf_key(k), v) for k, v in sd.items() if not (args.tie_word_embeddings and k == "output.weight")]


# ---- load ----------------------------------------------------------------------------------------

@torch.no_grad()
def load_hf_weights(model: nn.Module, folder: Path, args: ModelArgs,
                    process_group: dist.ProcessGroup | None = None) -> None:
    """Read a Hugging Face folder into the (parallelized, materialized) model's parameters in place."""
    start = time.perf_counter()
    targets: dict[str, torch.Tensor] = {}
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (HF-ordered buffer, parameter)
    for name, key, param in _hf_named(model, args):
        if name.endswith(QK):
            buf = torch.empty_like(param)
            pairs.append((buf, param))
            targets[key] = buf
        else:
            targets[key] = param  # shares the parameter's storage: DCP reads into it
    dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(folder)), process_group=process_group)
    _permute_into(pairs, unpermute_rows, args.head_dim)
    logger.info(f"initialized the model from the Hugging Face folder {folder} in {time.perf_counter() - start:.2f}s "
                "(fresh optimizer and schedule, step 0)")


# ---- export --------------------------------------------------------------------------------------

def file_index(sizes: dict[str, int], max_bytes: int) -> dict[str, int]:
    """HF name -> output file number (from 1), filling files in order up to max_bytes each."""
    index, used, out = 1, 0, {}
    for key, size in sizes.items():
        if used and used + size > max_bytes:
            index, used = index + 1, 0
        out[key], used = index, used + size
    return out


def export_config(cfg: Config, args: ModelArgs, dtype: str) -> dict:
    """config.json: the source folder's (token ids and the rest), with this run's shape and RoPE."""
    source = resolve_repo_path(cfg.model.hf_assets_path) / "config.json" if cfg.model.hf_assets_path else None
    config = json.loads(source.read_text(encoding="utf-8")) if source and source.is_file() else {}
    for key in ("rope_parameters", "dtype", "torch_dtype"):  # replaced by the classic keys below
        config.pop(key, None)
    config.update(hf_config(args))
    config["max_position_embeddings"] = max(args.max_position_embeddings, cfg.training.seq_len)
    config["torch_dtype"] = dtype
    return config


@torch.no_grad()
def export_hf(model: nn.Module, args: ModelArgs, cfg: Config, out: Path,
              process_group: dist.ProcessGroup | None = None, max_file_bytes: int = MAX_FILE_BYTES) -> None:
    """Write the model as a Hugging Face folder `out` (see the module docstring). Called on every rank."""
    start, rank = time.perf_counter(), dist.get_rank()
    dtype = getattr(torch, cfg.checkpoint.export_dtype)
    state: dict[str, torch.Tensor] = {}
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, HF-ordered copy)
    for name, key, param in _hf_named(model, args):
        if name.endswith(QK):
            buf = torch.empty_like(param, dtype=dtype)
            pairs.append((param, buf))
            state[key] = buf
        else:
            state[key] = param.to(dtype)  # the parameter itself when the dtype is the same
    _permute_into(pairs, permute_rows, args.head_dim)
    mapping = file_index({k: v.numel() * v.element_size() for k, v in state.items()}, max_file_bytes)

    tmp = out.with_name(out.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that did not finish
        (tmp / "sharded").mkdir(parents=True)
    dist.barrier(group=process_group)
    writer = HuggingFaceStorageWriter(str(tmp / "sharded"), fqn_to_index_mapping=mapping, save_distributed=True)
    dcp.save(state, storage_writer=writer, process_group=process_group)
    del state, pairs
    consolidate_safetensors_files_on_every_rank(str(tmp / "sharded"), str(tmp), mapping,
                                                process_group=process_group)  # ends with a barrier
    if rank == 0:
        shutil.rmtree(tmp / "sharded")
        config = export_config(cfg, args, cfg.checkpoint.export_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_assets(cfg, tmp, config)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
        logger.info(f"exported the model as a Hugging Face folder {out} ({cfg.checkpoint.export_dtype}, "
                    f"{max(mapping.values())} safetensors files) in {time.perf_counter() - start:.2f}s")
    dist.barrier(group=process_group)


def _copy_assets(cfg: Config, folder: Path, config: dict) -> None:
    """generation_config.json and the tokenizer files of model.hf_assets_path (a generation config
    from config.json's token ids when it has none)."""
    source = resolve_repo_path(cfg.model.hf_assets_path) if cfg.model.hf_assets_path else None
    for name in ("generation_config.json", *TOKENIZER_FILES):
        if source is not None and (source / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, folder / name)
    if not (folder / "generation_config.json").exists():
        ids = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
        (folder / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")

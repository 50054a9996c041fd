"""Parallel degrees -> a DeviceMesh with named dims (dp_replicate, dp_shard, cp, tp).

The degrees' rules (world size, seq_len, heads over tp, batch) live here; attention.check_cp_attention
holds the CP head/Ulysses/stride rules and validate.py the tiles-per-token rule. All run before any
process group exists, so a bad recipe fails with one line instead of a hang. Degree-1 dims cost
nothing: 1 and N ranks run the same code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtitan_sp.config import Config, ConfigError
from torchtitan_sp.models.shape import model_args


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> "ParallelDims":
        p = cfg.parallelism
        dp_rep, cp, tp = p.data_parallel_replicate_degree, p.context_parallel_degree, p.tensor_parallel_degree
        others = dp_rep * cp * tp
        if world_size % others:
            raise ConfigError(
                f"parallelism: data_parallel_replicate_degree {dp_rep} x context_parallel_degree {cp} x "
                f"tensor_parallel_degree {tp} = {others} does not divide the world size {world_size}")
        dp_shard = p.data_parallel_shard_degree
        if dp_shard == -1:
            dp_shard = world_size // others
        if dp_rep * dp_shard * cp * tp != world_size:
            raise ConfigError(
                f"parallelism: degrees dp_replicate {dp_rep} x dp_shard {dp_shard} x cp {cp} x tp {tp} = "
                f"{dp_rep * dp_shard * cp * tp}, but the world size is {world_size}")
        return cls(dp_replicate=dp_rep, dp_shard=dp_shard, cp=cp, tp=tp, world_size=world_size)

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that read different samples."""
        return self.dp_replicate * self.dp_shard

    def validate(self, cfg: Config) -> None:
        """Rules that combine the degrees with the model and the data."""
        args = model_args(cfg.model)
        t, p = cfg.training, cfg.parallelism
        # the model's constraint first: no seq_len fixes a tp that cannot split the heads
        if args.n_heads % self.tp or args.n_kv_heads % self.tp:
            raise ConfigError(
                f"parallelism.tensor_parallel_degree {self.tp} must divide the model's heads "
                f"(n_heads {args.n_heads}, n_kv_heads {args.n_kv_heads} for flavor {cfg.model.flavor})")
        headtail = self.cp > 1 and p.load_balance
        multiple = (2 * self.cp if headtail else self.cp) * self.tp
        if t.seq_len % multiple:
            need = f"2 x cp x tp = 2 x {self.cp} x {self.tp}" if headtail else f"cp x tp = {self.cp} x {self.tp}"
            raise ConfigError(f"training.seq_len {t.seq_len} is not divisible by {need} = {multiple}")
        tiles = cfg.activation_checkpoint.tiled_mlp_shards
        if tiles > 1 and self.tp > 1:  # w2's reduce-scatter would interleave the tiles' outputs
            raise ConfigError(f"activation_checkpoint.tiled_mlp_shards {tiles} does not combine with "
                              f"tensor_parallel_degree {self.tp} (TP already divides the feed-forward "
                              "intermediates by tp); use 1")
        if p.enable_async_tensor_parallel:
            if self.tp == 1:
                raise ConfigError("parallelism.enable_async_tensor_parallel needs tensor_parallel_degree > 1")
            if not cfg.compile.enable:
                raise ConfigError("parallelism.enable_async_tensor_parallel needs compile.enable = true "
                                  "(inductor overlaps the TP collectives with the matmuls)")
            if not torch.cuda.is_available():
                raise ConfigError("parallelism.enable_async_tensor_parallel needs CUDA GPUs (symmetric memory); "
                                  "none are visible here")
        gbs = t.global_batch_size
        if gbs != -1:
            per_step = t.local_batch_size * self.dp
            if gbs < per_step or gbs % per_step:
                raise ConfigError(
                    f"training.global_batch_size {gbs} must be a multiple of local_batch_size x dp degree = "
                    f"{t.local_batch_size} x {self.dp} = {per_step}")

    def grad_accum_steps(self, cfg: Config) -> int:
        t = cfg.training
        if t.global_batch_size == -1:
            return 1
        return t.global_batch_size // (t.local_batch_size * self.dp)

    def build_mesh(self, device_type: str) -> dict[str, DeviceMesh]:
        """The 4-D mesh ("world") and its named views: one per dim, plus the flattened
        `dp` (batch sharding), `dp_shard_cp` (FSDP2 shards parameters over it) and
        `dp_cp` (loss and token counts). With HSDP, `hsdp` is (dp_replicate, dp_shard_cp)."""
        world = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.cp, self.tp),
                                 mesh_dim_names=("dp_replicate", "dp_shard", "cp", "tp"))
        meshes = {"world": world, **{name: world[name] for name in world.mesh_dim_names}}
        meshes["dp"] = world["dp_replicate", "dp_shard"]._flatten("dp")
        meshes["dp_shard_cp"] = world["dp_shard", "cp"]._flatten("dp_shard_cp")
        meshes["dp_cp"] = world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        if self.dp_replicate > 1:
            with warnings.catch_warnings():
                # torch 2.13 warns that slicing a flattened dim is to be deprecated; the alternative
                # (_unflatten of dp_cp) would create two more process groups for the same ranks.
                warnings.filterwarnings("ignore", message="Slicing a flattened dim")
                meshes["hsdp"] = world["dp_replicate", "dp_shard_cp"]
        return meshes

"""The learner actor: one data-parallel rank owning a DeepSpeed engine (ZeRO; gloo on CPU, NCCL on GPU).

The actor group (actors/group.py) starts ``world_size`` of these and gives each its rank and the rendezvous
address. Every rank gets its share of the step's rows; the loss of each term is normalised by the token count
of the *global* batch, so the summed gradient equals that of the unsplit batch (see learners/losses.py).
``DeepSpeedRank`` holds what the policy learner and the critic (learners/critic.py) share.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path

from typing import TYPE_CHECKING

from learners.batch import TrainBatch, collate
from learners.losses import LossSpec

if TYPE_CHECKING:  # the config's section is passed in; learners/ does not import actors/
    from actors.config import LearnerConfig


def lr_factor(step: int, *, cfg: LearnerConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step``: linear warmup, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if not cfg.decay_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / cfg.decay_steps)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


LOOPBACK = "127.0.0.1"


def loopback_store(rank: int, world_size: int, port: int, timeout):
    """The process group's rendezvous store, listening on the loopback interface only (every rank on one node).

    torch's TCPStore binds its server to every interface whatever its host is (the host only says where clients
    connect), so rank 0 hands it a socket bound to 127.0.0.1 instead. The backends' own sockets follow
    GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, set to ``lo`` unless the user set them."""
    import socket

    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    listen_fd = None
    if rank == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(max(128, world_size))
        listen_fd = sock.detach()  # the store owns it now
    return dist.TCPStore(LOOPBACK, port, world_size, rank == 0, timeout=timeout, master_listen_fd=listen_fd)


class DeepSpeedRank:
    """One data-parallel rank of a DeepSpeed-trained model. Construction is cheap; ``setup()`` joins the process
    group once rank 0 has said where it listens (``address()``)."""

    def __init__(self, model_path: str, cfg: LearnerConfig, *, dtype: str, seed: int, rank: int, world_size: int):
        self.model_path, self.cfg, self.dtype, self.seed = model_path, cfg, dtype, seed
        self.rank, self.world_size = rank, world_size

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port: the rendezvous of the process group, asked of rank 0."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def _join(self, master_addr: str, master_port: int) -> None:
        import torch

        gpu = torch.cuda.is_available()
        if not gpu:
            os.environ["DS_ACCELERATOR"] = "cpu"  # must be set before deepspeed is imported
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if self.cfg.num_threads:  # 0: as actors/pools.py did not resolve it (a rank made by hand), torch's own
            torch.set_num_threads(self.cfg.num_threads)
        torch.manual_seed(self.seed)
        import deepspeed
        from transformers import AutoTokenizer

        backend = self.cfg.backend or ("nccl" if gpu else "gloo")
        if master_addr == LOOPBACK:  # every rank on this node (actors/pools.py): DeepSpeed adopts this group
            from deepspeed.constants import default_pg_timeout

            torch.distributed.init_process_group(
                backend, store=loopback_store(self.rank, self.world_size, master_port, default_pg_timeout),
                rank=self.rank, world_size=self.world_size, timeout=default_pg_timeout,
                # as DeepSpeed passes it: NCCL set up eagerly on this rank's GPU
                device_id=torch.device("cuda", 0) if gpu and self.world_size > 1 else None)
        deepspeed.init_distributed(dist_backend=backend)
        self.torch = torch
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        self.pad_id = AutoTokenizer.from_pretrained(self.model_path).pad_token_id

    def _initialize(self, model) -> None:
        import deepspeed

        cfg, torch = self.cfg, self.torch
        # One rank has nothing to partition: ZeRO's gradient buckets would only copy (about 0.1 s of a 0.8 s step
        # of the 27M model in bench/peers.py), so it trains unpartitioned; its checkpoints are then stage 0's.
        self.zero_stage = cfg.zero_stage if self.world_size > 1 else 0
        # Stage 0 on float32 weights leaves torch's AdamW unwrapped: DeepSpeed would take the gradient norm to clip
        # and keep none of it, so the norm is taken here once, for the metric and the clipping both.
        self.own_clipping = self.zero_stage == 0 and self.dtype == "float32"
        if cfg.compile:  # in place: the state dict keeps its names (weights out, checkpoints)
            model.compile(dynamic=True)  # one graph for every row length and micro-batch size
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,  # micro-batches are accumulated by hand in _step
            "gradient_clipping": 0.0 if self.own_clipping else cfg.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.dtype == "bfloat16"},
            "fp16": {"enabled": self.dtype == "float16"},
            # torch's AdamW, its fused kernel (one pass over the weights, CPU and GPU) rather than a loop of ops
            "optimizer": {"type": "AdamW", "params": {
                "lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay, "torch_adam": True,
                "fused": True}},
            "steps_per_print": 10**9,
        }

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg))

        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                               lr_scheduler=schedule)
        if self.world_size == 1:  # nothing to reduce: unpartitioned, DeepSpeed would still flatten every gradient
            #                       into buckets, all-reduce them with itself and copy them back (~0.1 s a step, 27M)
            self.engine.enable_backward_allreduce = False
        if self.own_clipping != (not hasattr(self.engine.optimizer, "_global_grad_norm")):
            raise RuntimeError(f"DeepSpeed wrapped the optimiser unexpectedly ({type(self.engine.optimizer).__name__} "
                               f"at ZeRO stage {self.zero_stage}, {self.dtype}): the gradient norm would be wrong")

    def _step(self, micro_batches: list[TrainBatch], loss_fn) -> dict[str, float]:
        """One optimiser step over this rank's micro-batches (every rank has the same number: see
        ``learners.batch.split_for_ranks``). ``loss_fn(tensors)`` returns ``(loss, metrics)`` with the loss already
        normalised by global counts; DeepSpeed averages gradients over ranks, so the loss is multiplied by the world
        size to make the result the global sum. Returns the metrics summed over micro-batches, grad norm and lr."""
        self.engine.train()
        num_micro = len(micro_batches)
        lr = float(self.engine.get_lr()[0])  # the rate this step uses (the scheduler advances in step())
        totals: dict = {}
        for k, micro in enumerate(micro_batches):
            loss, metrics = loss_fn(collate(micro, self.pad_id, self.device))
            # Accumulate over the micro-batches ourselves: their number changes from step to step with mu.
            self.engine.set_gradient_accumulation_boundary(k == num_micro - 1)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value
        norm = None
        if self.own_clipping:  # of the reduced gradients (the all-reduce ran in the last backward)
            params = [p for p in self.engine.module.parameters() if p.grad is not None]
            norm = self.torch.nn.utils.get_total_norm([p.grad for p in params])
            if self.cfg.grad_clip > 0:  # as DeepSpeed clips: scaled by grad_clip / (norm + 1e-6) when that is < 1
                self.torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm)
        self.engine.step()
        out = {name: float(value) for name, value in totals.items()}
        out["grad_norm"] = float(norm if norm is not None else self.engine.get_global_grad_norm() or 0.0)
        out["lr"] = lr
        return out

    def ready(self) -> int:
        """The process id: a new one after Ray restarts the actor."""
        return os.getpid()

    # --- checkpoints ------------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> None:
        """Every rank writes its part of the DeepSpeed state (module, ZeRO optimiser partition, lr scheduler) and its
        RNG states into ``directory`` (a collective: all ranks call it)."""
        from safetensors.torch import save_file

        torch = self.torch
        self.engine.save_checkpoint(directory, tag="state", save_latest=False)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, os.path.join(directory, f"rng-rank{self.rank}.safetensors"))

    def load_checkpoint(self, directory: str) -> None:
        """Restore what :meth:`save_checkpoint` wrote (same world size). DeepSpeed reads its own files with pickle: a
        checkpoint is the run's own output, never user- or model-made data."""
        from safetensors.torch import load_file

        torch = self.torch
        rng_file = os.path.join(directory, f"rng-rank{self.rank}.safetensors")
        if not os.path.isfile(rng_file):
            raise FileNotFoundError(f"{rng_file} is missing: the checkpoint was written by another number of ranks "
                                    f"than {self.world_size}, or is incomplete")
        path, _ = self.engine.load_checkpoint(directory, tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed state to load")
        rng = load_file(rng_file)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


class LearnerActor(DeepSpeedRank):
    """The policy. With ``reference`` it also holds a frozen copy of the initial model (the colocated reference).
    ``spec`` is the loss, and the sampling distribution every log-probability here is computed on."""

    def __init__(self, model_path: str, cfg: LearnerConfig, spec: LossSpec, *, dtype: str, seed: int,
                 rank: int, world_size: int, reference: bool = False):
        super().__init__(model_path, cfg, dtype=dtype, seed=seed, rank=rank, world_size=world_size)
        self.spec, self.with_reference = spec, reference

    def setup(self, master_addr: str, master_port: int) -> None:
        self._join(master_addr, master_port)
        from transformers import AutoModelForCausalLM

        from learners.reference import attention

        load = partial(AutoModelForCausalLM.from_pretrained, self.model_path, dtype=getattr(self.torch, self.dtype),
                       attn_implementation=attention(self.cfg.attention, self.device))
        self._initialize(load())
        self.ref_model = None
        if self.with_reference:
            self.ref_model = load().to(self.device).eval().requires_grad_(False)

    # --- forward passes ---------------------------------------------------------------------------------------

    def _forward(self, t):
        from learners.reference import autocast
        from learners.sampling import sampling_logprobs

        with autocast(self.device, self.cfg.autocast):
            logits = self.engine(input_ids=t.input_ids, attention_mask=t.attention_mask).logits[:, :-1]  # [B, L-1, V]
        logits = logits.float()  # the log-softmax in float32 whatever the matrix products ran in
        spec = self.spec
        return logits, sampling_logprobs(logits, t.targets, temperature=spec.temperature, top_p=spec.top_p,
                                         mask=t.mask)  # [B, L-1]

    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Log-probabilities of each row's response tokens under the current weights, on the sampling distribution:
        [B][L_i - P_i] (the proximal policy of ``algo.recompute_logprobs``)."""
        from learners.reference import response_logprobs

        self.engine.eval()
        return response_logprobs(self.engine, batch, self.pad_id, self.device, temperature=self.spec.temperature,
                                 top_p=self.spec.top_p, precision=self.cfg.autocast)

    def reference_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """The same under the frozen reference (colocated: ``reference=True``)."""
        from learners.reference import response_logprobs

        return response_logprobs(self.ref_model, batch, self.pad_id, self.device, temperature=self.spec.temperature,
                                 top_p=self.spec.top_p, precision=self.cfg.autocast)

    # --- one optimiser step -----------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[TrainBatch], *, mu: float, n_rl_tokens: int, n_rl_seqs: int,
                   n_sft_tokens: int) -> dict[str, float]:
        """One optimiser step on the CHORD loss; the counts are those of the whole mini-batch across ranks."""
        from learners.losses import chord_loss, entropy_from_logits

        torch = self.torch

        def loss_fn(t):
            logits, logprobs = self._forward(t)
            loss, metrics = chord_loss(
                logprobs, t.old_logprobs, t.advantages, t.mask, t.is_expert, self.spec, mu=mu,
                ref_logprobs=t.ref_logprobs, behaviour_logprobs=t.behaviour_logprobs, n_rl_tokens=n_rl_tokens,
                n_rl_seqs=n_rl_seqs, n_sft_tokens=n_sft_tokens,
            )
            with torch.no_grad():
                rl_mask = t.mask * (~t.is_expert).float().unsqueeze(-1)
                # of the tempered distribution the engines sample from (before the top-p nucleus)
                entropy = entropy_from_logits(logits / self.spec.temperature)  # [B, L-1]
                metrics["entropy"] = (entropy * rl_mask).sum() / max(n_rl_tokens, 1)
            return loss, metrics

        return self._step(micro_batches, loss_fn)

    # --- weights out ------------------------------------------------------------------------------------------

    def _full_state_dict(self) -> dict:
        """HF-named full weights on the CPU; under ZeRO-3 every rank must call this (it gathers shards)."""
        torch = self.torch
        module = self.engine.module
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
        with torch.no_grad():
            return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}

    def save_weights(self, path: str, dtype: str = "") -> int:
        """Write the full weights to a safetensors file (rank 0) for the rollout engines, in ``dtype`` (theirs; "" =
        as trained); returns its bytes. Rounded here as the engine would round them on loading, in half the bytes
        for bfloat16 engines of a float32 learner."""
        from safetensors.torch import save_file

        state = self._full_state_dict()
        if self.rank != 0:
            return 0
        if dtype:
            target = getattr(self.torch, dtype)
            state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
        tmp = f"{path}.tmp"
        save_file(state, tmp)
        os.replace(tmp, path)  # engines never see a half-written file
        return os.path.getsize(path)

    def save_pretrained(self, out_dir: str, tokenizer_dir: str) -> None:
        """The model in Hugging Face format (rank 0 writes), loadable by transformers and vLLM."""
        from transformers import AutoTokenizer

        state = self._full_state_dict()
        if self.rank == 0:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)

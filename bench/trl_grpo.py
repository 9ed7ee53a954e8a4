"""TRL's GRPOTrainer on a chorus model directory and prompt file: the peer of bench/peers.py.

Runs in TRL's own virtual environment (bench/peers.py makes it); imports nothing of chorus.

    .bench/trl/bin/python bench/trl_grpo.py --model DIR --prompts FILE.jsonl --steps 30 --out RESULT.json [--bf16]

The work per step is bench/peers.py's: ``--prompts-per-step`` prompts x ``--n`` samples of at most
``--max-new-tokens`` tokens, one optimiser step on all of them (no KL term: beta 0, so no reference model), an
exact-match reward. Gradient checkpointing is off (TRL's GRPOConfig turns it on by default; it only trades speed for
memory). Writes the wall-clock seconds of every optimiser step (generation included) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL rows {prompt, answer}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--bf16", action="store_true", help="TRL's bf16 mixed precision (autocast)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = load_dataset("json", data_files=args.prompts, split="train")

    def exact_match(completions: list[str], answer: list[str], **_) -> list[float]:
        return [float(c.strip() == a.strip()) for c, a in zip(completions, answer)]

    rows = args.prompts_per_step * args.n
    config = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(args.out) or ".", "trl-out"), use_cpu=True, seed=0,
        per_device_train_batch_size=rows, gradient_accumulation_steps=1, num_generations=args.n,
        max_completion_length=args.max_new_tokens, temperature=1.0, learning_rate=args.lr, beta=0.0,
        max_steps=args.steps, gradient_checkpointing=False, bf16=args.bf16, fp16=False,
        logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.started = 0.0

        def on_step_begin(self, *_, **__) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            self.seconds.append(time.perf_counter() - self.started)

    times = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[times])
    # The phase split: GRPOTrainer generates and scores in this method (a private one of TRL 1.16, timed when there)
    generate_seconds: list[float] = []
    make = getattr(trainer, "_generate_and_score_completions", None)
    if make is not None:
        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return make(*a, **kw)
            finally:
                generate_seconds.append(time.perf_counter() - start)
        trainer._generate_and_score_completions = timed
    trainer.train()
    with open(args.out, "w") as f:
        json.dump({"step_seconds": times.seconds, "generate_seconds": generate_seconds, "rows_per_step": rows,
                   "bf16": args.bf16, "threads": args.threads, "torch": torch.__version__}, f)


if __name__ == "__main__":
    main()

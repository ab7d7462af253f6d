"""A benchmark step inside a training run: greedy answers to a benchmark subset every few steps, scored
with that benchmark's official metrics and reported as `bench/<metric>` (`train.benchmark`).

The prompts, the answer clean-up and the metrics are those of `vistralv-ray eval --benchmark`
(evaluation/benchmarks.py, pure Python below this layer); only the generation differs: here it runs on
the training engine's own model, with the training tokenizer, template and pixels.

The driver reads the subset once (`load_subset`: the first `max_questions` questions with a readable
image) and hands it to the workers in the plan. The questions are dealt to the ranks round-robin; each
rank answers one question per `generate` call and every rank makes the same number of calls (a rank
short of questions repeats one and drops the answer). Under ZeRO-3 every forward gathers parameters
collectively, so `synced_gpus` keeps a rank whose answer has ended running forward passes until every
rank's has. The answers are gathered and scored on every rank: the same numbers everywhere.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vistralv_ray.config.loader import ConfigError
from vistralv_ray.config.schema import ModelConfig, TrainBenchmark
from vistralv_ray.errors import RecordError
from vistralv_ray.evaluation.benchmarks import clean_answer, get_benchmark
from vistralv_ray.evaluation.formats import Item
from vistralv_ray.logging import get_logger
from vistralv_ray.text.conversation import CONTROL_STRINGS, reject_control_strings
from vistralv_ray.text.templates import IMAGE_TOKEN
from vistralv_ray.training.metrics import BENCH_PREFIX

log = get_logger(__name__)


def load_subset(settings: TrainBenchmark) -> list[Item]:
    """The questions the run's benchmark step asks: the file's first `max_questions` with an image that
    decodes and no control token in its text (a question left out is counted in the log line)."""
    from vistralv_ray.data.images import verify_image

    path = Path(settings.data).expanduser()
    if not path.is_file():
        raise ConfigError(f"train.benchmark.data: {path} is not a file")
    loaded = get_benchmark(settings.name).read(path, settings.images)
    items, skipped = [], dict(loaded.rejected)
    for item in loaded.items:
        if len(items) == settings.max_questions:
            break
        try:
            if item.image is None:
                raise RecordError("missing_image", "no image")
            verify_image(item.image)
            # Checked here, once, not by every worker after the model is built: a control token in a
            # question would stop each rank (and each retry) at its first benchmark step.
            reject_control_strings(item.question or "", (*CONTROL_STRINGS, IMAGE_TOKEN), "the question")
        except RecordError as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        items.append(item)
    if not items:
        raise ConfigError(f"train.benchmark.data: no question with a usable image in {path} (left out: {skipped})")
    log.info(
        "benchmark step: %s, %d questions from %s%s",
        settings.name,
        len(items),
        path,
        f" (left out: {skipped})" if skipped else "",
    )
    return items


class BenchmarkStep:
    """Answers the subset with the engine's model and scores it; `due` says at which steps."""

    def __init__(
        self,
        settings: TrainBenchmark,
        items: list[Item],
        assembled,
        model_cfg: ModelConfig,
        rank: int,
        world: int,
        synced: bool,
    ):
        """`assembled`: the run's AssembledModel (tokenizer, chat template, image tokens)."""
        from vistralv_ray.data.images import decode_to_pixels, pixel_stats
        from vistralv_ray.text.conversation import ConversationEncoder
        from vistralv_ray.text.encoder import load_vision_config

        self.settings, self.items, self.rank, self.world = settings, items, rank, world
        self.synced = synced  # ZeRO-3 over several ranks: every rank runs every forward
        self.benchmark = get_benchmark(settings.name)
        self.tokenizer = assembled.tokenizer
        encoder = ConversationEncoder(
            assembled.tokenizer, assembled.chat_template, assembled.image_seq_length, model_cfg.max_length
        )
        size = model_cfg.image_size or load_vision_config(model_cfg.vision_tower).image_size
        fill = pixel_stats(model_cfg.vision_tower).fill
        # This rank's questions, padded to as many as the first rank has.
        mine = list(range(rank, len(items), world))
        calls = math.ceil(len(items) / world)
        self.asked = mine + [mine[0] if mine else 0] * (calls - len(mine))
        self.answered = len(mine)
        self.last_predictions: list[str] = []  # the cleaned answers of the last run, in the subset's order
        self.inputs = []
        for i in self.asked:
            content = f"<image>\n{self.benchmark.prompt(items[i])}"
            ids = encoder.encode_prompt([{"role": "user", "content": content}])
            pixels = decode_to_pixels(items[i].image, size, model_cfg.aspect, fill=fill)
            self.inputs.append((torch.from_numpy(ids)[None], torch.from_numpy(np.ascontiguousarray(pixels))[None]))

    def due(self, step: int, last: bool) -> bool:
        every = self.settings.every_steps
        return last or (every is not None and step % every == 0)

    @torch.no_grad()
    def run(self, engine, device: torch.device, dtype: torch.dtype, step: int) -> dict[str, float]:
        from vistralv_ray.model.assembly import llava_of
        from vistralv_ray.training.step import normalize_pixels, tower_pixel_stats

        started = time.perf_counter()
        llava = llava_of(engine.module)
        stats = tower_pixel_stats(engine.module)
        engine.eval()
        answers = []
        for ids, pixels in self.inputs:
            ids = ids.to(device)
            out = llava.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=normalize_pixels(pixels.to(device), dtype, stats),
                max_new_tokens=self.settings.max_new_tokens,
                do_sample=False,
                num_beams=1,
                synced_gpus=self.synced,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            answers.append(self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
        engine.train()
        local = list(zip(self.asked[: self.answered], answers[: self.answered], strict=True))
        gathered = [local]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, local)
        raw = dict(pair for part in gathered for pair in part)
        predictions = [clean_answer(raw[i]) for i in range(len(self.items))]
        self.last_predictions = predictions
        scores = {name: s.score() for name, s in self.benchmark.score(predictions, self.items).items()}
        if self.rank == 0:
            log.info(
                "benchmark %s at step %d: %s (%d questions, %.1f s)",
                self.settings.name,
                step,
                ", ".join(f"{name} {value:.4f}" for name, value in scores.items()),
                len(self.items),
                time.perf_counter() - started,
            )
        return {BENCH_PREFIX + name: value for name, value in scores.items()} | {
            BENCH_PREFIX + "questions": len(self.items)
        }

"""Rollouts with vLLM's offline ``LLM``, colocated with the trainer on the same GPU(s).

Phases alternate on one device: ``generate`` wakes the engine, samples, and puts it back to sleep
(``enable_sleep_mode``: level 1 offloads the weights to CPU and drops the KV cache, level 2 drops
both); after each optimizer step ``update_weights(model)`` wakes only the weights, copies the
trainer's parameters in with the model's own ``load_weights`` (which maps HF names, fuses qkv, ...)
and resets the prefix cache. vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so
that the weights are copied GPU to GPU, never serialised. vLLM is imported lazily: this module
imports without it, and building the engine without it raises an ImportError that says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from vold.data import is_multimodal, tokenizer_of
from vold.models import merged_state_dict
from vold.rollout.base import Rollout, RolloutEngine, completion_mask, pad_completions

if TYPE_CHECKING:
    from vold.data import PromptBatch


def _import_vllm() -> Any:
    # The engine must live in this process for update_weights to reach the model (set before import).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "rollout.engine='vllm' needs vLLM, which is not installed (pip install vllm, on a CUDA machine); "
            "use rollout.engine='hf' otherwise"
        ) from e
    return vllm


def named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the trainer's model under checkpoint names (``torch.compile`` prefix removed); a
    LoRA student's adapted weights merged, ``W + (alpha / r) B A`` (``vold.models.merged_state_dict``)."""
    for name, tensor in merged_state_dict(model).items():
        yield name.replace("_orig_mod.", ""), tensor.detach()


class VLLMRolloutEngine(RolloutEngine):
    """vLLM sampling of the student, loaded from ``model_path`` and kept in sync by :meth:`update_weights`."""

    def __init__(
        self,
        model_path: str,
        processor: Any,
        *,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = True,
        sleep_level: int = 1,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        dtype: str = "bfloat16",
        seed: int = 0,
        vocab_size: int | None = None,
        eos_token_ids: list[int] | None = None,
        max_images_per_prompt: int = 1,
        **llm_kwargs: Any,
    ):
        vllm = _import_vllm()
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        self.processor, self.tokenizer = processor, tokenizer_of(processor)
        self.multimodal = is_multimodal(processor)
        self.eos_token_ids = eos_token_ids or [self.tokenizer.eos_token_id]
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = self.eos_token_ids[0] if pad is None else pad
        # sampled ids stay in the shared vocabulary and are never image/video placeholders
        placeholders = {getattr(processor, k, None) for k in ("image_token_id", "video_token_id")} - {None}
        vocab = vocab_size if vocab_size is not None else len(self.tokenizer)
        self.allowed_token_ids = [i for i in range(vocab) if i not in placeholders]
        self.enable_sleep_mode, self.sleep_level = enable_sleep_mode, sleep_level
        kwargs: dict[str, Any] = dict(
            model=model_path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode, tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager, max_model_len=max_model_len,
            generation_config="vllm",  # sampling defaults are vLLM's, not the checkpoint's generation_config.json
        )
        if self.multimodal:
            kwargs["limit_mm_per_prompt"] = {"image": max_images_per_prompt, "video": 0}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # one engine per training rank (torchrun), tensor-parallel over the ranks of its group
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self._sampling_params_cls = vllm.SamplingParams
        self._asleep: set[str] = set()  # tags still asleep: "weights", "kv_cache"
        self._weights_valid = True
        self.sleep()  # give the memory to the trainer until the first rollout

    # ---- memory phases ------------------------------------------------------------------------

    def sleep(self) -> None:
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}
            if self.sleep_level == 2:
                self._weights_valid = False  # discarded: update_weights must run before the next generate

    def _wake(self, tags: list[str]) -> None:
        tags = [t for t in ("weights", "kv_cache") if t in tags and t in self._asleep]
        if not tags:
            return
        try:
            self.llm.wake_up(tags=tags)
        except TypeError:  # vLLM before wake-up tags: everything wakes at once
            self.llm.wake_up()
            tags = list(self._asleep)
        self._asleep -= set(tags)

    def wake_up(self) -> None:
        self._wake(["weights", "kv_cache"])

    # ---- weights ------------------------------------------------------------------------------

    def _apply_model(self, fn: Any) -> Any:
        if hasattr(self.llm, "apply_model"):  # vLLM >= 0.9: runs fn(model) inside each (in-process) worker
            return self.llm.apply_model(fn)
        return [fn(self.llm.llm_engine.model_executor.driver_worker.model_runner.model)]  # older engines

    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s parameters into the engine (wakes only the weights: the KV cache stays freed)."""
        self._wake(["weights"])
        weights = named_weights(model)
        self._apply_model(lambda vllm_model: vllm_model.load_weights(weights))
        self.llm.reset_prefix_cache()  # cached prefixes were computed by the old weights
        self._weights_valid = True

    # ---- sampling -----------------------------------------------------------------------------

    def _prompts(self, batch: PromptBatch) -> list[dict[str, Any]]:
        prompts = []
        input_ids, attention_mask = batch.student_inputs["input_ids"], batch.student_inputs["attention_mask"]
        for row, (text, images) in enumerate(zip(batch.student_texts, batch.images, strict=True)):
            if images:
                # vLLM's own processor expands the image placeholders of the rendered chat template
                image_data = images if len(images) > 1 else images[0]
                prompts.append({"prompt": text, "multi_modal_data": {"image": image_data}})
            else:  # the exact tokens the trainer scores
                prompts.append({"prompt_token_ids": input_ids[row][attention_mask[row].bool()].tolist()})
        return prompts

    def generate(self, batch: PromptBatch, num_generations: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | Sequence[int] | None = None, return_logprobs: bool = False) -> Rollout:
        """Note: vLLM's logprobs are of ``softmax(logits)`` before temperature ("raw" mode): equal to the
        trainer's ``softmax(logits / temperature)`` only at temperature 1. An int ``seed`` gives prompt i
        the seed ``seed + i``; a list gives each prompt its own."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(len(batch))]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != len(batch):
                raise ValueError(f"{len(seeds)} seeds for {len(batch)} prompts")
        self.wake_up()
        if not self._weights_valid:
            raise RuntimeError("the vLLM weights were dropped by sleep level 2: call update_weights(model) first")
        params = [
            self._sampling_params_cls(
                n=num_generations, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                seed=seeds[i], logprobs=0 if return_logprobs else None,
                stop_token_ids=self.eos_token_ids, allowed_token_ids=self.allowed_token_ids,
                detokenize=False,  # decoded here, from the same ids the trainer uses
            )
            for i in range(len(batch))
        ]
        outputs = self.llm.generate(self._prompts(batch), params, use_tqdm=False)
        self.sleep()

        sequences, logprob_rows = [], []
        for request in outputs:  # vLLM returns requests in input order
            if len(request.outputs) != num_generations:
                raise RuntimeError(f"vLLM returned {len(request.outputs)} completions, expected {num_generations}")
            for completion in request.outputs:
                ids = list(completion.token_ids)
                sequences.append(ids)
                if return_logprobs:
                    logprob_rows.append([completion.logprobs[t][token].logprob for t, token in enumerate(ids)])
        ids = pad_completions(sequences, self.pad_token_id)
        lengths = torch.tensor([len(s) for s in sequences])
        mask, finished = completion_mask(ids, self.eos_token_ids, lengths)
        ids = ids.masked_fill(mask == 0, self.pad_token_id)
        logprobs = None
        if return_logprobs:
            logprobs = torch.zeros(ids.shape, dtype=torch.float32)
            for row, values in enumerate(logprob_rows):
                logprobs[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
            logprobs *= mask
        texts = self.tokenizer.batch_decode([row[m.bool()] for row, m in zip(ids, mask, strict=True)],
                                            skip_special_tokens=True)
        return Rollout(ids, mask, texts, finished, num_generations, logprobs)

"""Facts of the router on Gemma 3's real vocabulary: prompt lengths, answer lengths, shared first tokens, output layer.

Not a speed benchmark: counts a team needs before pointing the router at medgemma-4b-it. Reads the vocabulary
fetched by ``onevlm fetch-vocabulary`` (never committed) and the real chat template; the image sequence is
medgemma-4b-it's (one ``<start_of_image>`` becomes 256 soft tokens of an 896 × 896 SigLIP image). Printed:

- tokens per stage prompt: stage 1 and 2 (text + 256 image tokens), stage 3 per modality (text only: min,
  median, max over the cards' modalities);
- token lengths of the admissible answers as the model writes them after ``<start_of_turn>model\\n`` (end of
  turn not counted): modality strings (+ None, Other), findings (+ Normal), card IDs;
- how many answers share their first token with another answer of the same stage (why a shown probability is the
  answer's own sequence probability, never its first token's);
- the output layer at the 4B shape (Gemma 3 4B text and SigLIP configuration, vocabulary 262,208, built on the
  ``meta`` device: no memory): its share of the parameters and of a decode step's bytes (a decode step reads every
  text weight once and one embedding row; the tied output layer is the whole embedding matrix).

    python bench/vocabulary_facts.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from onevlm.cards import CardRepository, default_cards_dir  # noqa: E402
from onevlm.router import prompts  # noqa: E402
from onevlm.vlm.backend import MODEL_TURN_OPENING  # noqa: E402
from onevlm.vlm.gemma3_vocabulary import chat_template, load_tokenizer, require_vocabulary  # noqa: E402
from onevlm.vlm.synthetic import GEMMA3_VOCAB_SIZE, SIZES, synthetic_config  # noqa: E402

from decode_step import decode_step_reads  # noqa: E402  (bench/decode_step.py)

IMAGE_TOKENS = 256


def prompt_length(processor, prompt: prompts.StagePrompt) -> int:
    """Tokens of a stage prompt through the chat template, the image expanded to its soft tokens."""
    user = [{"type": "text", "text": prompt.user}]
    if prompt.uses_image:
        user.insert(0, {"type": "image"})
    messages = [{"role": "system", "content": [{"type": "text", "text": prompt.system}]},
                {"role": "user", "content": user}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if prompt.uses_image:
        text = text.replace(processor.boi_token, processor.full_image_sequence)
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_tokens(tokenizer, answer: str) -> tuple[int, ...]:
    """The answer's tokens as they follow the model turn's opening (as the router scores options)."""
    opening = tokenizer(MODEL_TURN_OPENING, add_special_tokens=False)["input_ids"]
    ids = tokenizer(MODEL_TURN_OPENING + answer, add_special_tokens=False)["input_ids"]
    return tuple(ids[len(opening):])


def lengths(tokenizer, answers) -> dict:
    tokens = {a: answer_tokens(tokenizer, a) for a in answers}
    counts = [len(t) for t in tokens.values()]
    firsts = Counter(t[0] for t in tokens.values())
    shared = [a for a, t in tokens.items() if firsts[t[0]] > 1]
    return {"n": len(counts), "min": min(counts), "median": statistics.median(counts), "max": max(counts),
            "mean": statistics.mean(counts), "share_first_token": len(shared),
            "examples_sharing": sorted(shared)[:6]}


def output_layer_facts(tokenizer) -> dict:
    """Parameters and decode-step bytes of medgemma-4b-it's shape, counted on the meta device."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    config = synthetic_config(SIZES["medgemma-4b-shape"], tokenizer, GEMMA3_VOCAB_SIZE)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    # one definition of what a decode step reads (bench/decode_step.py, also behind router_bench's and
    # gpu_check.sh's bandwidth floor): every text weight once; of the embedding matrix, the lookup reads one
    # row and the (tied) output layer reads it all
    reads = decode_step_reads(model)
    total, text = reads["parameters"], reads["text_parameters"]
    return {"parameters": total, "text_parameters": text, "vision_parameters": total - text,
            "output_layer_parameters": reads["output_layer_parameters"],
            "tied_to_input_embedding": reads["tied_output_layer"],
            "output_layer_share_of_parameters": reads["output_layer_parameters"] / total,
            "output_layer_share_of_decode_step_bytes": reads["output_layer_share_of_decode_step"],
            "decode_step_bytes_bf16": 2 * reads["decoded_parameters"]}


def run() -> dict:
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    cards = CardRepository.load(default_cards_dir())
    folder = require_vocabulary()
    tokenizer = load_tokenizer(folder=folder)
    image_processor = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, image_mean=[0.5] * 3,
                                              image_std=[0.5] * 3, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template(folder=folder),
                                image_seq_length=IMAGE_TOKENS)
    stage3 = [prompt_length(processor, prompts.stage3_prompt(m, "Normal", [(c.id, c.task_caption)
                                                                        for c in cards.by_modality(m)]))
              for m in cards.modalities]
    findings = [f for f in cards.findings if f.lower() != "normal"]
    return {
        "vocabulary": len(tokenizer),
        "prompt_tokens": {
            "stage1": prompt_length(processor, prompts.stage1_prompt(cards.modalities)),
            "stage2": prompt_length(processor, prompts.stage2_prompt()),
            "image_tokens": IMAGE_TOKENS,
            "stage3": {"min": min(stage3), "median": statistics.median(stage3), "max": max(stage3),
                       "modalities": len(stage3)},
        },
        "answers": {
            "modalities": lengths(tokenizer, [*cards.modalities, "None", "Other"]),
            "findings": lengths(tokenizer, [*findings, "Normal"]),
            "card_ids": lengths(tokenizer, [c.id for c in cards]),
        },
        "output_layer_4b": output_layer_facts(tokenizer),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the facts here")
    args = parser.parse_args(argv)
    facts = run()
    print(json.dumps(facts, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``harness caption DIR --model M``: BLIP captions for every image in DIR that has none."""

from __future__ import annotations

from harness.data.images import DEFAULT_MAX_PIXELS


def add_arguments(parser) -> None:
    parser.add_argument("dir", help="dataset folder of images")
    parser.add_argument("--model", required=True,
                        help="BLIP or BLIP-2 model: local folder or hub id (e.g. Salesforce/blip-image-captioning-large)")
    parser.add_argument("--processor", help="processor folder or hub id (default: the model's)")
    parser.add_argument("--blip2", action="store_true", help="require a BLIP-2 checkpoint")
    parser.add_argument("--output", choices=("txt", "jsonl"), default="txt",
                        help="write .txt sidecars (default) or the text column of metadata.jsonl")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g = parser.add_argument_group("sampling")
    g.add_argument("--beams", type=int, default=3, help="beam search width (default 3; 1 with --sample)")
    g.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--min-words", type=int, default=0, help="regenerate longer until a caption has this many words")
    g.add_argument("--max-words", type=int, help="cut captions after this many words")
    g.add_argument("--max-retries", type=int, default=3, help="regeneration attempts for short captions")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--prompt", help="conditional text the caption continues, e.g. 'a photography of'")
    g.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="", help="text put before each caption")
    parser.add_argument("--suffix", default="", help="text put after each caption, e.g. ', unsplash photography' "
                        "(left out of a caption that already has its words; --prefix likewise)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing captions")
    parser.add_argument("--dry-run", action="store_true", help="print the captions; write nothing")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)


def run(args) -> int:
    from harness.caption.blip import caption_folder

    summary = caption_folder(
        args.dir, model=args.model, processor=args.processor, batch_size=args.batch_size, device=args.device,
        num_beams=1 if args.sample and args.beams == 3 else args.beams, do_sample=args.sample, top_p=args.top_p,
        temperature=args.temperature, repetition_penalty=args.repetition_penalty, min_words=args.min_words,
        max_words=args.max_words, max_retries=args.max_retries, max_new_tokens=args.max_new_tokens,
        prompt=args.prompt, prefix=args.prefix, suffix=args.suffix, overwrite=args.overwrite,
        dry_run=args.dry_run, blip2=args.blip2, output=args.output, max_pixels=args.max_pixels, seed=args.seed,
    )
    if args.dry_run:
        for path, caption in summary.captioned:
            print(f"{path}\t{caption}")
    print(summary.format())
    return 1 if summary.failed and not summary.captioned and not summary.skipped else 0

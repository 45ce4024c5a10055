"""dc_app's web app: `python app.py [--model 512] [--device cuda] [--dtype bf16] [--host 127.0.0.1] [--port 7860]`.

Options fall back to DC_APP_MODEL, DC_APP_DEVICE, GRADIO_SERVER_NAME and GRADIO_SERVER_PORT (Spaces and Docker
set the last two); the performance options (--dtype, --vae-dtype, --offload, --decode-chunk-size, --cfg-mode,
--compile, --ff-chunk-size, --weights-dtype, --low-vram, shared with the CLI in dc_app.options) to DC_APP_DTYPE,
DC_APP_VAE_DTYPE, DC_APP_OFFLOAD, DC_APP_DECODE_CHUNK_SIZE, DC_APP_CFG_MODE, DC_APP_COMPILE, DC_APP_FF_CHUNK_SIZE,
DC_APP_WEIGHTS_DTYPE and DC_APP_LOW_VRAM.

Importing this module does nothing heavy: `create_app` starts the model loading and builds the page. On ZeroGPU
(the `spaces` package importable) the model loads before the page starts, as ZeroGPU requires; elsewhere it
loads in a background thread, and the page is up meanwhile: a banner says what is happening (the checkpoint
download in GB, reading the weights, or the load error) and every request gets a plain "still loading" answer
until the model is ready.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from dc_app.loading.spec import MODEL_NAMES
from dc_app.options import add_performance_options, check_performance_options, describe, model_options, \
    service_options, settle_performance_options
from dc_app.storage import default_root

QUEUE_SIZE = 16      # waiting requests; one more gets Gradio's "queue is full" answer


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(description="DynamiCrafter image-to-video web app")
    p.add_argument("--model", default=env.get("DC_APP_MODEL", "512"), help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--device", default=env.get("DC_APP_DEVICE") or None,
                   help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--host", default=env.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--share", action="store_true", help="open a public gradio.live link (off by default)")
    add_performance_options(p, env)
    args = p.parse_args(argv)
    # Environment values skip argparse's `choices` check; check both forms the same way.
    if args.model not in MODEL_NAMES:
        p.error(f"--model/DC_APP_MODEL: expected one of {', '.join(MODEL_NAMES)}, got {args.model!r}")
    check_performance_options(p, args)
    return settle_performance_options(args)


def output_root() -> Path:
    """Everything the app writes (results, Gradio's uploads and copies) lives under one temp folder: Gradio's own.
    Gradio serves files from it, so the API can hand out results without widening allowed_paths."""
    return Path(os.environ.get("DC_APP_OUTPUT_DIR") or os.environ.get("GRADIO_TEMP_DIR") or default_root())


def create_app(args: argparse.Namespace):
    """Start loading the model and build the page -> the queued gr.Blocks (not launched yet).

    On ZeroGPU (the `spaces` package importable) the model loads right here, before the page exists, as ZeroGPU
    requires; elsewhere it loads in a background thread and the page is up meanwhile.
    """
    root = output_root()
    # Gradio reads GRADIO_TEMP_DIR when it is imported, so this comes before the imports below.
    os.environ["GRADIO_TEMP_DIR"] = str(root)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("dc_app").setLevel(logging.INFO)  # one line per cancelled run, full tracebacks of failures

    from dc_app import load_for_serving
    from dc_app.loading.spec import load_model_config, model_spec
    from dc_app.faults import fault_from_env
    from dc_app.loading.background import ModelLoader
    from dc_app.service import Service
    from dc_app.ui import build_demo

    faults = fault_from_env()  # read once, before the slow part: a typo stops the start at once
    spec = model_spec(load_model_config(args.model))
    # The log says what the wait is (the page says it too, once it is up).
    why = "seeded random weights, no download" if spec.random_weights else \
        "the first start downloads its checkpoint, several GB, into the Hugging Face cache"
    print(f"dc_app: loading the {args.model} model ({why}; {describe(args)})...", file=sys.stderr, flush=True)
    loader = ModelLoader(args.model, lambda: load_for_serving(args.model, device=args.device, **model_options(args)),
                         delay=faults.load_delay if faults else 0.0, fail=bool(faults and faults.load_error))
    if importlib.util.find_spec("spaces") is not None:
        loader.load_now()  # ZeroGPU patches device moves at start-up: the model must exist before the page does
    else:
        loader.start()
    service = Service(loader, output_dir=root, fault=faults, **service_options(args))
    demo = build_demo(service)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    demo = create_app(args)
    from dc_app.images import MAX_FILE_BYTES
    from dc_app.ui import CSS, THEME
    from dc_app.uploads import ASSETS_DIR

    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=MAX_FILE_BYTES,  # the image loader's own limit: Gradio refuses more before it reaches disk
        allowed_paths=[str(ASSETS_DIR)],
        theme=THEME,
        css=CSS,
        # Only gr.Error messages reach a caller: dc_app's handlers raise those, in plain words without paths or
        # internals. Anything else (a Python exception inside Gradio) is logged here and answered without text.
        show_error=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])

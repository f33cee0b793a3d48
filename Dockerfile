# gpu-cost-agent as a container image (README, "Kubernetes"). Build from the repository root:
#   docker build -t gpu-cost-agent:0.1.0 .
# Try it without a GPU (the bundled H100 replay):   docker run --rm -p 9842:9842 gpu-cost-agent:0.1.0 demo
# On a GPU host with the NVIDIA Container Toolkit:  docker run --rm --gpus all --pid host -p 9842:9842 \
#   -v /var/lib/gpu-cost-agent:/var/lib/gpu-cost-agent --user 0 gpu-cost-agent:0.1.0 run --state-dir /var/lib/gpu-cost-agent
# NVML itself is not in the image: the toolkit mounts the host driver's libnvidia-ml.so.1.

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent/ agent/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# [kubernetes]: grpcio, for pod names from the kubelet's pod-resources socket;
# [web]: PyYAML and bcrypt, for TLS and basic auth (--web.config.file).
COPY --from=build /wheels/ /wheels/
RUN set -eu; \
    pip install --no-cache-dir "$(ls /wheels/gpu_cost_agent-*.whl)[kubernetes,web]"; \
    rm -rf /wheels; \
    useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gpucost
# Non-root by default. The DaemonSet runs it as uid 0 without capabilities, for the kubelet's
# socket and the hostPath state directory, which only root may use (deploy/kubernetes/daemonset.yaml).
USER 10001:10001
EXPOSE 9842
ENTRYPOINT ["gpu-cost-agent"]
CMD ["run"]

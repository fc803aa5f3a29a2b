# dra-cpu: the DaemonSet's image. Two stages: the build stage makes a venv and installs the package from this
# repository into it; the final stage is the same base with only that venv copied in.
#
# BASE must have python3 >= 3.11 with the venv module. The default is the official slim image (pinned by version;
# pin it by digest too where a registry is reachable: `docker buildx imagetools inspect <image>`). Tests build with a
# local Debian bookworm base (hack/testenv/image-base.sh): --build-arg BASE=localhost/dra-cpu-base:bookworm.
ARG BASE=docker.io/library/python:3.11.13-slim-bookworm

FROM ${BASE} AS build
RUN python3 -m venv /opt/dra-cpu
COPY pyproject.toml README.md /src/
COPY dra_cpu /src/dra_cpu
# Bytecode is compiled here on purpose: the daemon runs with a read-only root filesystem, where Python cannot
# cache it, and compiling the kubernetes client on every start would cost seconds.
RUN /opt/dra-cpu/bin/pip install --no-cache-dir --disable-pip-version-check /src \
 && /opt/dra-cpu/bin/pip uninstall --yes --quiet pip setuptools \
 && rm -rf /src

FROM ${BASE}
COPY --from=build /opt/dra-cpu /opt/dra-cpu
ENV PATH=/opt/dra-cpu/bin:$PATH \
    PYTHONUNBUFFERED=1
# `discover`, `slices` and `bench` need no privilege. `run` needs uid 0 (without any capability): it writes CDI
# specs, the checkpoint and its sockets into root-owned host folders and connects to the root-owned NRI socket; the
# Helm chart sets runAsUser: 0 for it.
USER 65532:65532
ENTRYPOINT ["dra-cpu"]
CMD ["--help"]

# The image of every forgeml Ray pod (head, workers, job submitters): Ray 2.60 with
# forgeml, its jobs and examples installed. The default base is Ray's CPU image; for GPU
# nodes build with
#   --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# Created by the image's user (ray), so that the build below can write into it.
RUN mkdir -p /home/ray/forgeml
WORKDIR /home/ray/forgeml
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users platform ./platform
RUN pip install --no-cache-dir . && python -c "import forgeml, ray; assert ray.__version__ == '2.60.0'"
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users examples ./examples

# Pods run it with a read-only root filesystem: Ray writes under /tmp (an emptyDir).
ENV PYTHONDONTWRITEBYTECODE=1 HOME=/tmp/home
USER ray

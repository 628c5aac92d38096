# bmojo on the Neuron SDK 2.28 PyTorch training image: the last SDK whose torch-neuronx and
# neuronx-distributed still train on trn1 (torch 2.9, torch-xla 2.9, neuronx-distributed 0.17).
#   docker build -t bmojo-trn1 .
#   docker run --device=/dev/neuron0 ... --device=/dev/neuron15 bmojo-trn1 \
#       launch/torchrun.sh pretrain_370m_trn1 data.hub_name=...
# The image already holds the versions pinned by the `neuron` extra of pyproject.toml, so installing the
# extra changes nothing there; the Neuron package index serves them if a layer ever lacks one.
FROM public.ecr.aws/neuron/pytorch-training-neuronx:2.9.0-neuronx-py312-sdk2.28.0-ubuntu24.04

ARG NEURON_PIP_INDEX=https://pip.repos.neuron.amazonaws.com
WORKDIR /opt/bmojo

COPY pyproject.toml README.md ./
COPY src ./src
COPY neuron_kernels ./neuron_kernels
RUN pip install --no-cache-dir --extra-index-url "${NEURON_PIP_INDEX}" -e ".[neuron]"

COPY recipes ./recipes
COPY launch ./launch

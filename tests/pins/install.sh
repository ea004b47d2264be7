#!/usr/bin/env bash
# The peers' versions that tests pin to reproduce a bug, fetched beside the installed ones into .pins/ (git-ignored):
# transformers 5.14.1 (its label smoothing under gradient accumulation; with the tokenizers and hub it accepts) for
# tests/test_hf_trainer.py, and the Transformer Engine wheels of tests/pins/transformer-engine.txt for
# tests/test_transformer_engine.py, and the fla-core wheels of tests/pins/fla.txt for tests/test_fla.py. The README's test command runs this; nothing is fetched while tests run.
set -euo pipefail
cd "$(dirname "$0")/../.."
pip install -q --upgrade --no-deps --target .pins/transformers-5.14.1 transformers==5.14.1 tokenizers==0.22.2 \
    huggingface-hub==1.33.0
grep -v '^#' tests/pins/transformer-engine.txt | xargs -n1 pip download -q --no-deps -d .pins/wheels
grep -v '^#' tests/pins/fla.txt | xargs -n1 pip download -q --no-deps -d .pins/fla
# megatron-core 0.19.2 (multi-token prediction with PR 3159's rescale) for tests/test_megatron_mtp.py: no wheel for
# Python 3.11, but its modules are pure Python; the cp312 wheel is unpacked beside the installed 0.16.1.
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .pins/wheels megatron-core==0.19.2
python -m zipfile -e .pins/wheels/megatron_core-0.19.2-*.whl .pins/megatron-core-0.19.2

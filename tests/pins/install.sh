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

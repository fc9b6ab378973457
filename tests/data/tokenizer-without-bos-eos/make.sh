#!/usr/bin/env bash
# Two sentencepiece models without a BOS piece and without an EOS piece (text.txt:
# random words of the passkey filler), for the tokenizer's error tests.
set -euo pipefail
cd "$(dirname "$0")"
for k in bos eos; do
  spm_train --input=text.txt --model_prefix=no_$k --vocab_size=40 --${k}_id=-1 --model_type=bpe \
    --normalization_rule_name=identity --minloglevel=2
  rm no_$k.vocab
done

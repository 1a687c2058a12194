"""Formal languages as jit-compiled PCFGs: sampling, recognition, parsing and labels.

Public API::

    g = grammars.get("dyck2")                 # or grammars.from_string("S -> ...")
    batch = grammars.sample(key, g, 128)      # tokens [B, T] int32, sentence_mask [B, T]
    grammars.is_grammatical(g, batch.tokens)  # bool [B]
    grammars.selected_mask(g, batch, "sentence")  # bool [B, T] the tokens an SAE sees
    grammars.labels(g, batch.tokens)          # dict of int32 [B, T] ground-truth features
    grammars.valid_next(g, batch.tokens)      # bool [B, T, V] grammatical next tokens
    grammars.parse(g, batch.tokens)           # CKY: verdict, log-prob, per-token depth
    g.vocab, g.decode(batch.tokens)
"""

from jaxsae.grammars.cky import parse
from jaxsae.grammars.features import label_info
from jaxsae.grammars.features import LabelInfo
from jaxsae.grammars.features import labels
from jaxsae.grammars.features import valid_next
from jaxsae.grammars.library import get
from jaxsae.grammars.library import names
from jaxsae.grammars.pcfg import Grammar
from jaxsae.grammars.rules import GrammarError
from jaxsae.grammars.recognise import is_grammatical
from jaxsae.grammars.recognise import layout
from jaxsae.grammars.sampler import Batch
from jaxsae.grammars.sampler import max_sentence_len
from jaxsae.grammars.sampler import sample
from jaxsae.grammars.sampler import selected_mask


def from_string(text: str, *, name: str = "custom", terminals=None) -> Grammar:
  """Builds a grammar from NLTK-style rule text (see `jaxsae.grammars.pcfg`).

  Args:
    text: rules such as "S -> S S [0.3] | a [0.7]"; the first left-hand side is the start.
    name: a name for reports and checkpoints.
    terminals: optional vocabulary order of the terminals (default: order of first use).

  Raises:
    GrammarError: naming the rule or symbol at fault.
  """
  from jaxsae.grammars import pcfg  # pylint: disable=g-import-not-at-top
  return pcfg.from_text(text, name=name, kind="pcfg", terminals=terminals)


__all__ = [
    "Batch", "Grammar", "GrammarError", "LabelInfo", "from_string", "get", "is_grammatical",
    "label_info", "labels", "layout", "max_sentence_len", "names", "parse", "sample",
    "selected_mask", "valid_next",
]

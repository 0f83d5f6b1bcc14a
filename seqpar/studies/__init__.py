"""Studies: orchestration that uses both training and evaluation (it sits above
`seqpar.train` and `seqpar.eval`; neither imports it).

- `seqpar study extend CONFIG` (`seqpar.studies.extend`): the context-extension methods
  table (none / PI / dynamic NTK / ABF / YaRN / Llama-3), zero-shot and after continued
  pretraining, perplexity on the same tokens at every length, passkey by depth.
"""

"""EVE in third-party evaluation harnesses.

- `eve.integrations.lmms`: the lmms-eval model `eve` (`lmms-eval --model eve --model_args pretrained=EXPORT`).
- `eve.integrations.vlmevalkit`: `EveVLM`, a VLMEvalKit model (`generate_inner(message, dataset)`).
- `eve.integrations.harness`: what both share: prompts in the model's template, one batch of answers
  cut at stop strings, and continuation log-likelihoods.

Neither harness is a dependency of the library: each adapter imports its harness only when loaded
(`pip install -e ".[eval]"` for lmms-eval; VLMEvalKit is installed from its git checkout).
"""

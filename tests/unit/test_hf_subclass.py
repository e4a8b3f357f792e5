"""A user's own HFAutoModel subclass (the example README's) keeps what the built-in archs have: recompute."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fairseq_ext.cube.runtime.recompute import apply_recompute
from fairseq_ext.models.hf_auto import HFAutoModel
from tests.helpers import MODEL_DIR


class MyCausalLM(HFAutoModel):
    auto_class = AutoModelForCausalLM


def test_subclass_trains_with_recomputed_decoder_layers():
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR))
    reference = MyCausalLM(AutoModelForCausalLM.from_config(hf_model.config))
    reference.hf_model.load_state_dict(hf_model.state_dict())
    assert apply_recompute(hf_model, ["LlamaDecoderLayer"]) == hf_model.config.num_hidden_layers
    model = MyCausalLM(hf_model).train()
    reference.train()
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 14))
    logits = model(ids, torch.ones_like(ids))  # HFAutoModel.forward, the one a subclass inherits
    logits.float().logsumexp(-1).sum().backward()
    expected = reference(ids, torch.ones_like(ids))
    expected.float().logsumexp(-1).sum().backward()
    torch.testing.assert_close(logits, expected)
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name.replace("._checkpoint_wrapped_module", "")])

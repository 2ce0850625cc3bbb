"""sample.py: text from a trained checkpoint, and from Hugging Face GPT-2 weights."""
import pytest
import torch

import sample
import train
from harness import GPT2_BPE
from nanodist.errors import UserError
from nanodist.model.gpt import GPT, model_config
from nanodist.data.tokenizer import get_gpt2_encoding


def test_samples_from_a_trained_checkpoint_decode_to_its_characters(char_data, tmp_path, capsys):
    assert train.main(["--device", "cpu", "--model", "tiny", "--dataset", "shakespeare_char",
                       "--data_dir", char_data, "--out_dir", str(tmp_path), "--batch_size", "4",
                       "--block_size", "64", "--total_batch_size", "1024", "--max_steps", "30",
                       "--eval_interval", "30", "--eval_iters", "1", "--learning_rate", "3e-3"]) == 0
    capsys.readouterr()
    assert sample.main(["--out_dir", str(tmp_path), "--start", "ROMEO:", "--max_new_tokens", "50",
                        "--num_samples", "1"]) == 0
    text = capsys.readouterr().out.split("\n---------------")[0]
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 50
    # 30 steps of training: spaces and lower-case letters dominate, as in the play
    assert sum(c == " " or c.islower() for c in text[6:]) > 30


def test_gpt2_weights_from_hugging_face(tmp_path, capsys):
    import transformers  # dev extra; a random model stands in for the published weights
    hf_cfg = transformers.GPT2Config(n_positions=64, n_embd=128, n_layer=4, n_head=4)
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    torch.save(hf.transformer.state_dict(), tmp_path / "pytorch_model.bin")  # the hub's key names
    args = ["--init_from", "gpt2-hf-state-dict", str(tmp_path / "pytorch_model.bin"), "--preset",
            "tiny", "--bpe_file", str(GPT2_BPE), "--max_new_tokens", "5", "--num_samples", "1",
            "--start", "Hello"]
    assert sample.main(args) == 0
    assert capsys.readouterr().out.startswith("Hello")
    ours = sample.load_hf_file(str(tmp_path / "pytorch_model.bin"), "tiny")
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[..., :50257], hf.eval()(idx).logits, rtol=1e-5, atol=1e-5)
    assert isinstance(ours, GPT) and ours.config == model_config("tiny", 64, 50257)


def test_bad_inputs_end_with_one_clear_message(tmp_path, capsys):
    assert sample.main(["--out_dir", str(tmp_path)]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    torch.save({"something": torch.zeros(1)}, tmp_path / "x.bin")
    assert sample.main(["--init_from", "gpt2-hf-state-dict", str(tmp_path / "x.bin")]) == 2
    assert "not a GPT-2 state dict" in capsys.readouterr().err


def test_text_streams_as_it_is_drawn_and_decodes_as_a_whole(capsys):
    """Tokens print as they come; an incremental decoder holds a character's first bytes
    until its last arrives, so the text equals decoding all ids at once."""
    enc = get_gpt2_encoding(str(GPT2_BPE))
    text = "naïve café, 日本語 and 🙂 — all split over byte-level tokens"
    ids = enc.encode(text)
    assert any(not enc.decode_single_token_bytes(i).decode("utf-8", "ignore") for i in ids)  # split chars
    sample.stream(ids, enc.decode_bytes)
    assert capsys.readouterr().out == text


def test_a_prompt_outside_a_character_vocabulary_is_refused(capsys):
    encode, _ = sample.codec({"name": "char", "itos": list("abc ")}, None)
    assert encode("a cab") == [0, 3, 2, 0, 1]
    with pytest.raises(UserError, match=r"--start holds 2 character\(s\) this character-level model never saw: 'XZ'"):
        encode("aXbZ")


def test_the_default_prompt_suits_a_vocabulary_without_newline(tmp_path, monkeypatch, capsys):
    """--start defaults to a newline; a character model that never saw one starts from token 0."""
    step_dir = tmp_path / "step_0000001"
    step_dir.mkdir()
    (step_dir / "trainer.json").write_text("{}")  # find() takes it for a checkpoint
    itos = list("abc ")
    model = GPT(model_config("tiny", 16, len(itos)), seed=0)
    info = {"tokenizer": {"name": "char", "itos": itos}}
    monkeypatch.setattr(sample.checkpoint, "load_model", lambda *args: (model, info))
    assert sample.main(["--checkpoint", str(step_dir), "--max_new_tokens", "5", "--num_samples", "1"]) == 0
    text = capsys.readouterr().out.split("\n---------------")[0]
    assert len(text) == 6 and set(text) <= set(itos)  # token 0 ("a"), then 5 drawn

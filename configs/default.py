"""Default Loom config: a small byte-level model on the Python standard library's source.

Command:  python -m train --workdir /tmp/loom
Hardware: any laptop CPU (2 cores suffice); the same file runs unchanged on a GPU or TPU host.
Expected: ~4.5 minutes on a 2-core AVX-512 CPU (measured 273 s); train loss falls from ~5.6 to
          ~1.7, final eval loss 1.58 nats/token (2.28 bits per byte).

Every key of every Loom config is declared here, once, with one comment. Other config files are
short diffs over this one. Override any key on the command line: --config.train.steps=100.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, data order and sampling

  # --- data: where text comes from and how it becomes fixed-length training rows.
  c.data = ml_collections.ConfigDict()
  # "stdlib" | "files:<dir|glob>" | "tfds:<name>[:<ver>]" | "chat:<jsonl>" | "prefs:<jsonl>"
  c.data.source = "stdlib"
  c.data.store_shard_mb = 256.0  # prepared stores are written in shards of about this many MB
  # Weighted mixture instead of data.source: ((source, weight), ...), each row's source drawn
  # from the weights (input_pipeline/mixture.py); () = off.
  c.data.mixture = ()
  c.data.mixture_stages = ()  # ((start step, (w1, w2, ...)), ...): weights from that step on
  c.data.text_feature = "text"  # the text field of "tfds:" examples, *.jsonl records, *.parquet
  c.data.tfds_data_dir = ""  # TFDS data dir for "tfds:" sources ("" = TFDS default)
  c.data.tfds_download = True  # download a "tfds:" dataset not prepared there (False: refuse)
  # Processes other than 0 wait this long for process 0 to prepare the data (multi-process runs).
  c.data.prepare_timeout_s = 3600.0
  # Several processes: each tokenizes its share of the documents into the shared data.cache_dir
  # and process 0 packs them (the same store byte for byte); False: process 0 prepares alone.
  c.data.parallel_prepare = False
  # Re-hash every array of the prepared store at start-up (False: check its manifest, sizes and
  # shapes only; `python -m input_pipeline.prepare --verify` does the full check on demand).
  c.data.verify_store = False
  # Prepared stores (and locally built TFDS datasets) live here; may be gs://... (shared by hosts).
  c.data.cache_dir = "~/.cache/loom"
  c.data.validation_percent = 5  # eval share: of files (by name hash), a lone file's lines, chats
  c.data.tokenizer = "byte"  # "byte" | "sentencepiece" | "hf:<dir with tokenizer.json>"
  c.data.spm_model = ""  # existing SentencePiece .model file; "" trains one on the train split
  c.data.spm_vocab_size = 8000  # vocabulary size when training a SentencePiece model
  c.data.seq_len = 256  # tokens per training row seen by the model (rows are seq_len + 1 packed)

  # --- model: a decoder-only transformer (models/config.py reads this group, the one source).
  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = -1  # -1 = the tokenizer's vocabulary size
  c.model.d_model = 256  # residual stream width
  c.model.num_layers = 4  # transformer blocks
  c.model.num_heads = 4  # query heads
  c.model.num_kv_heads = -1  # key/value heads (-1 = num_heads; 1 = multi-query; else grouped)
  c.model.head_dim = -1  # per-head width (-1 = d_model // num_heads)
  c.model.mlp_dim = 1024  # hidden width of the MLP
  c.model.mlp = "swiglu"  # "swiglu" | "gelu"
  c.model.norm = "rms"  # "rms" | "layer"
  c.model.norm_eps = 1e-6  # epsilon of every norm
  c.model.positions = "rope"  # "rope" | "learned"
  c.model.rope_theta = 10000.0  # RoPE base frequency
  c.model.rope_scaling = "none"  # "none" | "llama3" (Llama 3.1/3.2 long-context RoPE scaling)
  c.model.rope_scaling_factor = 8.0  # llama3 scaling: how far low frequencies are stretched
  c.model.rope_low_freq_factor = 1.0  # llama3 scaling: wavelengths above original / this stretch
  c.model.rope_high_freq_factor = 4.0  # llama3 scaling: wavelengths below original / this stay
  c.model.rope_original_max_len = 8192  # llama3 scaling: the context the model was trained at
  c.model.max_seq_len = -1  # longest sequence (learned positions, decoding); -1 = data.seq_len
  c.model.qk_norm = False  # RMS-normalise queries and keys per head
  c.model.tie_embeddings = True  # the output layer reuses the token embedding
  c.model.use_bias = False  # biases on dense layers and norms (GPT-2 style)
  c.model.qkv_bias = False  # biases on the query/key/value projections only (Qwen2 style)
  c.model.dtype = "float32"  # compute dtype ("bfloat16" for TPU/GPU)
  c.model.param_dtype = "float32"  # parameter (and optimizer state) dtype
  c.model.scan_layers = False  # stack layers on a "layers" axis and scan (faster compiles)
  # Activation rematerialisation per block: "none" | "full" (keep nothing) | "save_dots" (matmul
  # outputs) | "save_attention" (the attention kernel's output) | "save_mlp" (the MLP's input
  # projections) | "save_attention_mlp" (both).
  c.model.remat = "none"
  # Attention kernel: "auto" (cuDNN flash attention on Hopper or later GPUs in bf16/fp16, Pallas
  # splash attention on TPUs, the XLA einsum elsewhere) | "xla" | "cudnn" | "splash" (interpreted
  # off TPUs: slow).
  c.model.attention = "auto"
  # cuDNN attention takes packed rows as ragged sequences, at most this many per row (documents,
  # padding counted as one); its float32 softmax statistics grow with it (B·M·heads·length). A
  # batch with a fuller row stops the run with an error naming this key.
  c.model.max_segments = 64
  # Attention when mesh.context > 1 splits each row (models/context_parallel.py, striped layout):
  # "all_gather" (every shard gathers the row's keys/values) | "ring" (keys/values passed
  # round the context axis, online softmax). Exact either way; unused at mesh.context = 1.
  c.model.attention_context = "all_gather"
  # The projections' matmuls (attention q/k/v/out, the MLP), forward and backward: "none" |
  # "fp8" (e4m3/e5m2, rowwise current scaling; H100/H200) | "int8" (per-channel, int32 sums;
  # TPUs, A100 and later). Where the hardware table says the chips cannot run it natively (CPUs,
  # fp8 on a TPU), quant_emulation=True must say that running it as an emulation is meant.
  c.model.quant = "none"
  c.model.quant_emulation = False
  c.model.attention_block = 64  # causal attention by blocks of this many queries (0 = whole rows)
  c.model.init_std = 0.02  # std of the normal initialiser of dense and embedding weights
  c.model.lora_rank = 0  # > 0: train low-rank adapters of this rank only, the rest frozen
  c.model.lora_alpha = 16.0  # adapter scale: the update is A·B·lora_alpha/lora_rank
  c.model.lora_targets = ("q", "k", "v", "out")  # adapted kernels: q k v out gate up down
  # Mixture of experts (models/moe.py) in place of every layer's MLP; num_experts = 0: dense.
  c.model.moe = ml_collections.ConfigDict()
  c.model.moe.num_experts = 0  # E routed experts per layer (0 = a dense MLP)
  c.model.moe.experts_per_token = 2  # K experts each token is sent to
  c.model.moe.expert_dim = -1  # each expert's hidden width (-1 = model.mlp_dim)
  c.model.moe.shared_experts = 0  # experts every token also passes through (Qwen2-MoE, DeepSeek)
  c.model.moe.first_dense = 0  # the first k layers keep the dense MLP (DeepSeek-V3: 3)
  c.model.moe.router = "softmax"  # "softmax" (Mixtral, Qwen3) | "sigmoid" + a bias (DeepSeek-V3)
  c.model.moe.norm_topk = True  # renormalise the K chosen weights to sum to 1
  # "dropless" (grouped matmul) | "capacity" (drops overflow) | "auto" (capacity on CPUs, else
  # dropless; models/moe.py)
  c.model.moe.dispatch = "dropless"
  c.model.moe.capacity_factor = 1.25  # capacity dispatch: slots per expert × K·tokens / E
  c.model.moe.balance_loss = 0.01  # weight of the load-balancing loss (1 at balance; 0 = off)
  c.model.moe.router_z_loss = 0.001  # weight of the router z-loss (0 = off)
  c.model.moe.bias_rate = 0.001  # sigmoid router: the selection bias's step toward equal load

  # --- mesh: device mesh sizes and the one table from logical axis names to mesh axes.
  c.mesh = ml_collections.ConfigDict()
  # pipeline stages: the scanned layers split into this many runs of layers (models/pipeline.py)
  c.mesh.stage = 1
  c.mesh.data = 1  # pure data-parallel replicas (-1 = the rest of the devices)
  c.mesh.fsdp = -1  # parameter-sharded data parallelism (-1 = the rest of the devices)
  # context parallelism: each row's length split over it (long rows; model.attention_context)
  c.mesh.context = 1
  c.mesh.expert = 1  # expert parallelism: MoE experts split over it, tokens sent by all-to-all
  c.mesh.tensor = 1  # tensor (model) parallelism over heads and MLP
  c.mesh.dcn_stage = 1  # multi-slice / multi-node: stages across slices (× mesh.stage)
  c.mesh.dcn_data = 1  # multi-slice / multi-node: data replicas across slices (× mesh.data)
  c.mesh.dcn_fsdp = 1  # multi-slice / multi-node: fsdp sharding across slices (× mesh.fsdp)
  c.mesh.dcn_context = 1  # multi-slice / multi-node: rows split across slices (× mesh.context)
  c.mesh.dcn_expert = 1  # multi-slice / multi-node: experts split across slices (× mesh.expert)
  c.mesh.dcn_tensor = 1  # multi-slice / multi-node: tensor split across slices (× mesh.tensor)
  c.mesh.rules = (  # logical axis -> mesh axes (None = replicated)
    ("batch", ("data", "fsdp", "expert")),  # outside the experts, the expert axis splits batch
    ("expert", "expert"),  # with mesh.expert=1 the experts' kernels shard over fsdp (embed)
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", "stage"),  # the scanned layers' stack: pipeline stages (none at mesh.stage=1)
    ("length", "context"),  # activations' row axis; no parameter is split over context
    ("positions", None),  # the learned-positions table's rows
    ("cache_length", None),  # the KV cache's slots
  )

  # --- pipeline: the schedule when mesh.stage × mesh.dcn_stage > 1 splits the layers into stages
  # (models/pipeline.py); idle fraction (stages - 1) / (repeats × microbatches + stages - 1).
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.microbatches = -1  # each step's rows cut into this many (-1 = one per stage)
  c.pipeline.repeats = 1  # 1: GPipe; R > 1: circular, each stage runs R slices of layers
  # (an all-to-all of the layer weights each step keeps the checkpoint schedule-independent)

  # --- optim: AdamW with warmup, a decay schedule and global-norm clipping.
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-3  # peak learning rate
  c.optim.schedule = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
  c.optim.warmup_steps = 25  # linear warmup from 0 to the peak
  c.optim.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak
  c.optim.b1 = 0.9  # Adam first-moment decay
  c.optim.b2 = 0.95  # Adam second-moment decay
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.weight_decay = 0.1  # decoupled weight decay on dense kernels
  c.optim.decay_embeddings = False  # also decay embedding tables
  c.optim.decay_norms_and_biases = False  # also decay norm scales and biases
  c.optim.grad_clip_norm = 1.0  # clip gradients to this global norm (0 = off)
  c.optim.z_loss = 0.0  # weight of logsumexp(logits)^2 in the loss (PaLM uses 1e-4; 0 = off)

  # --- train: the loop.
  c.train = ml_collections.ConfigDict()
  c.train.steps = 250  # optimizer steps
  # "lm" (next-token cross-entropy) | "dpo" (preference pairs of a prefs: source; the dpo group)
  # | "grpo" (rollouts of the rl group's prompts; python -m train.rl runs it)
  c.train.objective = "lm"
  c.train.batch_size = 16  # global batch, in rows of data.seq_len tokens
  c.train.microbatches = 1  # gradient accumulation: split each batch into this many parts
  c.train.loss_chunk = 0  # positions per chunk of the output layer + loss (0 = all at once)
  c.train.eval_every = 125  # run eval every N steps (and at the end; 0 = only at the end)
  c.train.eval_batches = 8  # validation batches per eval (a fixed set)
  # Loss spikes: "off" | "skip" (the step) | "rollback" (to the last checkpoint; docs/reliability)
  c.train.spike_policy = "skip"
  c.train.spike_factor = 2.5  # a spike is a loss above this × the running mean of accepted losses
  c.train.max_consecutive_skips = 20  # stop the run after this many skipped steps in a row
  c.train.max_rollbacks = 3  # stop the run after this many rollbacks ("rollback" policy)

  # --- dpo: preference tuning on prefs: pairs (train.objective = "dpo"; train/dpo.py).
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1  # β: strength of the implicit KL to the reference (SimPO: its reward scale)
  c.dpo.loss = "sigmoid"  # "sigmoid" (DPO) | "ipo" | "simpo" (reference-free)
  c.dpo.label_smoothing = 0.0  # ε: the share of pairs assumed flipped (cDPO; sigmoid and simpo)
  c.dpo.simpo_gamma = 0.5  # γ: SimPO's target reward margin

  # --- rl: GRPO on sampled completions (train.objective = "grpo", python -m train.rl;
  # train/grpo.py, train/rl/). train.batch_size counts completions, data.seq_len bounds each
  # prompt + completion, train.steps and checkpoint.every count optimizer steps.
  c.rl = ml_collections.ConfigDict()
  c.rl.prompts = ""  # JSON lines {"prompt": str | "messages": [...], any other fields}
  c.rl.eval_prompts = ""  # held-out prompts, scored greedily at each eval ("" = no eval)
  c.rl.eval_limit = 64  # held-out prompts scored per eval (0 = all)
  # Reward functions "package.module:function", each (prompts, completions, **fields) ->
  # list[float], fields being the records' other fields as lists (train/rl/rewards.py ships two).
  c.rl.rewards = ("train.rl.rewards:exact_match",)
  c.rl.reward_weights = ()  # the rewards' weights in the total (() = 1 each)
  c.rl.group_size = 8  # G completions per prompt; divides train.batch_size
  c.rl.max_new_tokens = 32  # tokens sampled per completion at most
  c.rl.temperature = 1.0  # sampling temperature (> 0); the log-probs use it too
  c.rl.top_p = 1.0  # nucleus sampling (1 = off)
  c.rl.inner_steps = 1  # μ: optimizer steps on each rollout batch; divides train.steps
  c.rl.epsilon = 0.2  # ε: the importance ratio is clipped to [1 - ε, 1 + ε]
  c.rl.kl_coef = 0.04  # β: weight of the k3 KL to the reference (0 = no reference model)

  # --- harness: EleutherAI lm-eval tasks at each eval (python -m train.evaluate runs them on
  # any checkpoint). Off by default; needs the [eval] extra.
  c.harness = ml_collections.ConfigDict()
  c.harness.tasks = ()  # lm-eval task names run at each eval, e.g. ("hellaswag",); () = off
  c.harness.include_path = ""  # a folder of task YAML files with local data (offline tasks)
  c.harness.limit = 50  # documents per task at each in-training eval (0 = all)
  c.harness.num_fewshot = -1  # few-shot examples (-1 = the task's own)
  c.harness.batch_size = 16  # requests scored per batch

  # --- checkpoint: Orbax checkpoints under WORKDIR/checkpoints.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 125  # save every N steps (and at the end; 0 = only at the end)
  c.checkpoint.max_to_keep = 3  # keep the newest N checkpoints
  c.checkpoint.async_save = True  # write checkpoints in the background
  # zstd-compress checkpoint arrays: ~8% fewer bytes of float state for ~3x the CPU time of a
  # save, which CPU-bound hosts take from their steps (True on hosts with idle cores, if bytes
  # matter more).
  c.checkpoint.compress = False
  # Resume even if the data fingerprint, the model, train.batch_size or seed changed.
  c.checkpoint.allow_mismatch = False
  c.checkpoint.verify = True  # check each checkpoint's checksums before restoring from it
  # A save that fails in a way that may pass (a store's error) is logged and the next save tries
  # again; after this many failures in a row, or at once for a full disk or lost permissions, the
  # run stops with the cause (docs/reliability.md).
  c.checkpoint.save_retries = 2
  c.checkpoint.save_timeout_s = 1200  # the longest one save may take, all processes together
  # The local tier (docs/reliability.md): every local_every steps each process saves its own
  # shards to local_dir (a RAM disk or local SSD of its host; "" = off) and sends a replica to
  # one peer (local_replicas); a restart resumes from the newest step of either tier.
  c.checkpoint.local_dir = ""
  c.checkpoint.local_every = 25
  c.checkpoint.local_keep = 2  # local steps kept per process (and per peer's replica)
  c.checkpoint.local_replicas = 1  # 0: a replaced host restores from the persistent tier
  c.checkpoint.init_from = ""  # a new run's weights: "hf:<HF model dir>" | "loom:<workdir>[@step]"

  # --- log: what the loop reports.
  c.log = ml_collections.ConfigDict()
  c.log.every = 10  # log train metrics every N steps
  c.log.tensorboard = True  # also write TensorBoard event files
  c.log.wandb_project = ""  # Weights & Biases project ("" = off; the [wandb] extra)
  c.log.progress = True  # show a progress line on process 0
  c.log.sample_prompt = "def "  # prompt of the greedy sample shown at each eval
  c.log.sample_tokens = 64  # tokens in that sample (0 = off)
  c.log.profile_steps = ()  # (start, stop): jax.profiler trace of those steps in WORKDIR/profile

  # --- meter: the energy estimate in report.json (power table: train/meter/hardware.py).
  c.meter = ml_collections.ConfigDict()
  c.meter.power_watts = 0.0  # watts per device; 0 = look the device up in the table
  c.meter.pue = 1.1  # data-centre power usage effectiveness (1.0 = count the devices only)
  c.meter.grid_kg_per_kwh = 0.4  # grid carbon intensity, kg CO2e per kWh (world mean ~0.45)

  # --- debug: fault injection for tests of the failure paths (train/faults.py); leave empty.
  c.debug = ml_collections.ConfigDict()
  c.debug.nan_steps = ()  # poison the batches at these data positions (1-based) with NaN weights
  # SIGKILL every process once step N's local save (and any persistent save in flight) is done
  c.debug.kill_at_step = 0
  c.debug.spike_steps = ()  # at these data positions, targets become the last id: a loss spike

  return c

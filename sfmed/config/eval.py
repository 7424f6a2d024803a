"""Schema of ``launch/evaluate.py`` (YAML under ``conf/eval/`` only sets values).

Validation runs in ``__post_init__`` so that a bad value fails before any model is loaded,
with a message naming the value and the fix. :func:`register` puts the schema into Hydra's
ConfigStore; it imports Hydra lazily so that library code and tests can use the dataclasses
without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sfmed.core.errors import ConfigError, ConfigErrors, Problems

TASKS = (
    "mcq",
    "rouge_pairwise",
    "judge_pairwise",
    "reference_metrics",
    "drug_indication",
    "consultation",
)
PAIRWISE_TASKS = ("rouge_pairwise", "judge_pairwise")
BACKENDS = ("hf", "transformers", "vllm", "openai")


class EvalConfigError(ConfigError):
    """An evaluation setting that cannot work; the message names the value and the fix."""


class EvalConfigErrors(ConfigErrors, EvalConfigError):
    """Several evaluation settings that cannot work, reported together."""


@dataclass
class DecodingConfig:
    """Generation parameters; recorded verbatim in every result JSON."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy decoding
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    repetition_penalty: float = 1.0
    seed: int = 1234  # seeds sampling (per batch for hf, per request for vllm/openai)

    def __post_init__(self):
        p = Problems(EvalConfigErrors)
        if self.max_new_tokens < 1:
            p.add(f"decoding.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            p.add(f"decoding.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            p.add(f"decoding.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            p.add("decoding.top_k must be >= 0 and repetition_penalty > 0")
        p.raise_if_any()

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax."""
        return self.temperature == 0


@dataclass
class HFConfig:
    """The transformers backend (CPU or GPU)."""

    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 8
    attn_implementation: str | None = None  # e.g. sdpa / flash_attention_2; None = default
    trust_remote_code: bool = False
    """Run the modelling/tokenizer code a folder ships (``auto_map``: Baichuan's
    ``modeling_baichuan.py`` / ``tokenization_baichuan.py``); only for code you trust."""

    def __post_init__(self):
        p = Problems(EvalConfigErrors)
        p.choice("hf.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.batch_size < 1:
            p.add(f"hf.batch_size={self.batch_size} must be >= 1")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            p.add(f"hf.device={self.device!r}: use auto, cpu, cuda or cuda:N")
        p.raise_if_any()


@dataclass
class VLLMConfig:
    """The vLLM backend (optional install: ``pip install 'sfmed[vllm]'``)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    max_model_len: int | None = None


@dataclass
class APIConfig:
    """An OpenAI-compatible endpoint (``backend=openai`` and the judge use the same client)."""

    base_url: str | None = None  # default: $OPENAI_BASE_URL, else api.openai.com
    model: str | None = None  # model name served by the endpoint
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from YAML
    timeout: float = 120.0
    max_retries: int = 3  # transport retries (connection errors, 429, 5xx)
    concurrency: int = 4  # parallel requests

    def __post_init__(self):
        if self.concurrency < 1 or self.timeout <= 0 or self.max_retries < 0:
            raise EvalConfigError("api: concurrency >= 1, timeout > 0 and max_retries >= 0")


@dataclass
class JudgeConfig(APIConfig):
    """The LLM judge: an OpenAI-compatible endpoint, a fixed rubric, deterministic settings."""

    temperature: float = 0.0
    max_tokens: int = 1024
    seed: int = 1234
    format_retries: int = 2  # re-asks after a reply without a readable verdict
    use_reference: bool = True  # show the reference answer to the judge


PROMPT_PRESETS = ("sfmed", "lm_eval", "opencompass", "opencompass_gen")
CONTINUATIONS = ("letter", "option_text")
SCORINGS = ("continuation", "sequence")


@dataclass
class MCQPromptConfig:
    """The exam prompt: a preset, and optional overrides of its parts (null = the preset's).

    ``sfmed`` (default): ``以下是中国关于{subject}考试的{kind}，请选出其中的正确答案。``, options
    stripped, ``答案：`` then the bare letter. ``lm_eval``: byte-identical to lm-evaluation-
    harness's ``cmmlu``/``ceval-valid`` tasks (their opening line per benchmark, options as
    published, continuation `` A`` after the target delimiter, raw prompt without chat template
    unless use_chat_template/chat_format says otherwise). ``opencompass`` / ``opencompass_gen``:
    byte-identical to OpenCompass's CMMLU/C-Eval PPL / gen configs for a base model, the former
    scored as OpenCompass's PPLInferencer (``scoring=sequence``). docs/evaluation.md shows all.
    """

    preset: str = "sfmed"
    opening: str | None = None  # first line; {subject} and {kind} are filled in
    option_format: str | None = None  # one option line, e.g. "{letter}. {text}"
    answer_cue: str | None = None  # ends the question block, e.g. "答案："
    target_delimiter: str | None = None  # between the cue and the answer ("" or " ")
    strip: bool | None = None  # strip whitespace around the question and option texts
    continuation: str | None = None  # loglik candidates: letter | option_text
    # loglik: continuation (sum log P of the answer given the prompt) | sequence (mean NLL of the
    # whole prompt + answer text, as OpenCompass's PPLInferencer)
    scoring: str | None = None

    def __post_init__(self):
        p = Problems(EvalConfigErrors)
        p.choice("mcq.prompt.preset", self.preset, PROMPT_PRESETS)
        if self.continuation is not None:
            p.choice("mcq.prompt.continuation", self.continuation, CONTINUATIONS)
        if self.scoring is not None:
            p.choice("mcq.prompt.scoring", self.scoring, SCORINGS)
        if self.option_format is not None:
            p.check(
                "{letter}" in self.option_format and "{text}" in self.option_format,
                f"mcq.prompt.option_format={self.option_format!r} must contain {{letter}} and "
                "{text}",
            )
        p.raise_if_any()


@dataclass
class MCQConfig:
    """Exam multiple choice."""

    mode: str = "generate"  # generate (answer extraction) | loglik (score option letters)
    shots: int = 0  # k-shot examples taken from dev_data (same subject), in file order
    dev_data: str | None = None
    prompt: MCQPromptConfig = field(default_factory=MCQPromptConfig)

    def __post_init__(self):
        p = Problems(EvalConfigErrors)
        p.choice("mcq.mode", self.mode, ("generate", "loglik"))
        if self.shots < 0:
            p.add(f"mcq.shots={self.shots} must be >= 0")
        if self.shots > 0 and not self.dev_data:
            p.add(f"mcq.shots={self.shots} needs mcq.dev_data=<dev split file or folder>")
        p.raise_if_any()


@dataclass
class TextMetricConfig:
    """ROUGE/BLEU settings shared by rouge_pairwise and reference_metrics."""

    tokenizer: str = "char"  # char | jieba
    epsilon: float = 0.0  # rouge_pairwise: A wins only when ahead by more than this
    bleu_level: str = "corpus"  # corpus | sentence (mean of smoothed sentence BLEU)

    def __post_init__(self):
        p = Problems(EvalConfigErrors)
        p.choice("metric.tokenizer", self.tokenizer, ("char", "jieba"))
        p.choice("metric.bleu_level", self.bleu_level, ("corpus", "sentence"))
        if self.epsilon < 0:
            p.add(f"metric.epsilon={self.epsilon} must be >= 0")
        p.raise_if_any()


@dataclass
class DrugConfig:
    """QiZhenGPT drug-indication evaluation."""

    prompt: str = "{drug}的适应病症"
    label_sep: str = "|"

    def __post_init__(self):
        if "{drug}" not in self.prompt:
            raise EvalConfigError(f"drug.prompt={self.prompt!r} must contain '{{drug}}'")


SUITE_KINDS = ("qa", "mcq", "consultation", "drug")


@dataclass
class SuiteModel:
    """One model of a suite: a column of the tables (or a row, for per-model tables)."""

    name: str = ""  # label in the tables (and the folder of its generations)
    model: str | None = None  # HF folder (hf/vllm) or served model name (openai)
    backend: str = "hf"  # hf | vllm | openai
    tokenizer: str | None = None  # tokenizer folder when the model folder has none
    chat_format: str = "auto"  # how chats become its prompt (sfmed/eval/chat_formats.py)
    base_url: str | None = None  # openai: the endpoint (default $OPENAI_BASE_URL)
    # answers made elsewhere, by dataset name (JSONL {id, output}); used instead of generating
    generations: dict[str, str] = field(default_factory=dict)


@dataclass
class SuiteDataset:
    """One data set of a suite: a row of its table."""

    name: str = ""  # row label, e.g. huatuo26M
    kind: str = "qa"  # qa (QA-ROUGE / QA-GPT) | mcq (选择题) | consultation (CMB-Clin) | drug
    data: str = ""
    format: str = "auto"
    group: str | None = None  # qa: datasets of one group get a pooled row after them ("All")
    cases: str | None = None  # consultation: case descriptions
    limit: int | None = None


@dataclass
class SuiteConfig:
    """Several models × several data sets → the seed reports' tables (docs/evaluation.md)."""

    name: str = "report"
    ours: str | None = None  # the model compared against every other (default: the first)
    models: list[SuiteModel] = field(default_factory=list)
    datasets: list[SuiteDataset] = field(default_factory=list)
    judge_qa: bool = False  # also the QA-GPT table (LLM judge; needs judge.model)
    all_row: str = "All"  # label of pooled rows (QA groups, all MCQ questions)

    def check(self) -> list[str]:
        """Every problem of the suite's lists, as messages naming the entry and the fix."""
        problems = []
        names = [m.name for m in self.models]
        if len(names) < 1:
            problems.append("suite.models is empty: list at least one model")
        if len(set(names)) != len(names) or "" in names:
            problems.append(f"suite.models: every model needs a unique name (got {names})")
        ds_names = [d.name for d in self.datasets]
        if not ds_names:
            problems.append("suite.datasets is empty: list at least one data set")
        if len(set(ds_names)) != len(ds_names) or "" in ds_names:
            problems.append(f"suite.datasets: every data set needs a unique name (got {ds_names})")
        bad = [n for n in names + ds_names if "/" in n or "\\" in n or n.startswith(".")]
        if bad:
            problems.append(
                f"suite: names {bad} are used as file names; drop '/', '\\' and leading dots"
            )
        if self.ours is not None and self.ours not in names:
            problems.append(f"suite.ours={self.ours!r} is not one of the models {names}")
        for d in self.datasets:
            if d.kind not in SUITE_KINDS:
                problems.append(
                    f"suite.datasets[{d.name}].kind={d.kind!r} is not one of {list(SUITE_KINDS)}"
                )
            if not d.data:
                problems.append(f"suite.datasets[{d.name}] needs data=<file or folder>")
            if d.limit is not None and d.limit < 1:
                problems.append(f"suite.datasets[{d.name}].limit={d.limit} must be >= 1")
        for m in self.models:
            if m.backend not in ("hf", "vllm", "openai"):
                problems.append(
                    f"suite.models[{m.name}].backend={m.backend!r} is not one of hf, vllm, openai"
                )
            unknown = sorted(set(m.generations) - set(ds_names))
            if unknown:
                problems.append(
                    f"suite.models[{m.name}].generations names unknown data sets {unknown}"
                )
            missing = [d for d in ds_names if d not in m.generations]
            if missing and not m.model:
                problems.append(
                    f"suite.models[{m.name}] has no model= and no generations for {missing}: "
                    "give one of them"
                )
            if m.model and m.backend in ("hf", "vllm") and missing:
                try:
                    check_model_folder(m.model, m.tokenizer, where=f"suite.models[{m.name}].model")
                except EvalConfigError as e:
                    problems.append(str(e))
        return problems

    @property
    def ours_name(self) -> str:
        """The model every comparison is made from."""
        return self.ours or self.models[0].name


@dataclass
class EvalConfig:
    """One evaluation run: a task, its data, and where answers come from."""

    task: str = "mcq"
    data: str | None = None
    format: str = "auto"  # see docs/evaluation.md for the formats of each task
    dataset_name: str | None = None  # table row/column label; default: data file/folder name
    model: str | None = None  # HF folder (hf/vllm) or served model name (openai); side A
    model_b: str | None = None  # pairwise side B from a model
    backend: str = "hf"  # hf (= transformers) | vllm | openai
    generations: str | None = None  # JSONL {id, output}: score without a model
    generations_a: str | None = None
    generations_b: str | None = None
    name_a: str | None = None
    name_b: str | None = None
    cases: str | None = None  # consultation: case descriptions (CMB-Clin ``id``/``case``)
    output_dir: str = "outputs/eval"
    overwrite: bool = False
    strict: bool = True  # False: skip and count bad rows / missing generations
    limit: int | None = None  # first N items only (smoke runs)
    tokenizer: str | None = None  # tokenizer folder for model= when the model folder has none
    tokenizer_b: str | None = None  # the same for model_b=
    # How chats become prompt text (sfmed/eval/chat_formats.py): auto (the tokenizer's chat
    # template when it has one, else plain) | template | plain | a registered family format
    chat_format: str = "auto"
    chat_format_b: str = "auto"
    use_chat_template: bool | None = None  # shorthand: true = template, false = plain
    system_prompt: str | None = None
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    hf: HFConfig = field(default_factory=HFConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    api: APIConfig = field(default_factory=APIConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    mcq: MCQConfig = field(default_factory=MCQConfig)
    metric: TextMetricConfig = field(default_factory=TextMetricConfig)
    drug: DrugConfig = field(default_factory=DrugConfig)
    # A suite (conf/eval/suite/<name>.yaml, selected with suite=<name>): many models × data sets
    # into the seed reports' tables; task/data/model= are then unused.
    suite: SuiteConfig | None = None

    def __post_init__(self):
        p = Problems(EvalConfigErrors)
        task_ok = p.choice("task", self.task, TASKS)
        p.choice("backend", self.backend, BACKENDS)
        if self.backend == "transformers":
            self.backend = "hf"
        if self.suite is not None:
            p.messages += self.suite.check()
            kinds = {d.kind for d in self.suite.datasets}
            if "mcq" in kinds and self.mcq.mode != "generate":
                p.add(
                    f"mcq.mode={self.mcq.mode}: a suite scores generated answers; use "
                    "mcq.mode=generate (or single runs for log-likelihood scoring)"
                )
            if ("consultation" in kinds or self.suite.judge_qa) and not self.judge.model:
                p.add(
                    "the suite has a judged table (consultation data or judge_qa=true): set "
                    "judge.model=<served model name> (and judge.base_url= or $OPENAI_BASE_URL)"
                )
            p.raise_if_any()
            return
        if not self.data:
            p.add(f"task={self.task} needs data=<file or folder>")
        if self.limit is not None and self.limit < 1:
            p.add(f"limit={self.limit} must be >= 1 (or null for all)")
        # What answers a task needs is judged only for a known task; each of those checks
        # stops at its first problem because the later ones assume the earlier hold.
        if task_ok:
            with p.collect():
                self._check_answers()
        p.raise_if_any()

    def _check_answers(self) -> None:
        """Raise the first problem with where the answers come from (model, files, judge)."""
        if self.task in PAIRWISE_TASKS:
            self._check_pairwise()
        else:
            if self.generations_a or self.generations_b or self.model_b:
                raise EvalConfigError(
                    f"task={self.task} scores one model: use model= or generations=, not _a/_b"
                )
            if self.model and self.generations:
                raise EvalConfigError(
                    "pass either model= (generate) or generations= (score a file)"
                )
            needs_answers = self.task != "consultation"
            if needs_answers and not (self.model or self.generations):
                raise EvalConfigError(
                    f"task={self.task} needs model=<hf folder> or generations=<jsonl>"
                )
            if self.task == "mcq" and self.mcq.mode == "loglik" and not self.model:
                raise EvalConfigError(
                    "mcq.mode=loglik scores option letters with a model: set model="
                )
        if self.task in ("judge_pairwise", "consultation"):
            self._check_judge()
        if self.backend in ("hf", "vllm"):
            for m, t in ((self.model, self.tokenizer), (self.model_b, self.tokenizer_b)):
                if m:
                    check_model_folder(m, t)
                    if self.backend == "hf":
                        check_remote_code(m, t, self.hf.trust_remote_code)
        if self.backend == "openai" and self.task == "mcq" and self.mcq.mode == "loglik":
            raise EvalConfigError(
                "mcq.mode=loglik needs token log-probabilities: use backend=hf or vllm"
            )

    def _check_pairwise(self) -> None:
        if self.generations:
            raise EvalConfigError(
                f"task={self.task} compares two answer sets: use generations_a=/generations_b= "
                "(or model=/model_b=) instead of generations="
            )
        if bool(self.model) == bool(self.generations_a):
            raise EvalConfigError(
                f"task={self.task}: side A needs exactly one of model=, generations_a="
            )
        if bool(self.model_b) == bool(self.generations_b):
            raise EvalConfigError(
                f"task={self.task}: side B needs exactly one of model_b=, generations_b="
            )

    def _check_judge(self) -> None:
        if not self.judge.model:
            raise EvalConfigError(
                f"task={self.task} needs an LLM judge: set judge.model=<served model name> "
                "(and judge.base_url= or $OPENAI_BASE_URL for a non-OpenAI endpoint)"
            )

    @property
    def uses_model(self) -> bool:
        """True when answers are generated here (a backend gets loaded)."""
        return bool(self.model or self.model_b)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model_folder(model: str, tokenizer: str | None = None, where: str = "model") -> None:
    """Refuse, before anything loads, a model folder without ``config.json`` or a tokenizer."""
    if not (Path(model) / "config.json").is_file():
        raise EvalConfigError(
            f"{where}={model} is not a Hugging Face model folder (no config.json); convert "
            "a Megatron checkpoint with launch/convert.py to=hf, or use backend=openai "
            "for a served model name"
        )
    tok = Path(tokenizer) if tokenizer else Path(model)
    if not any((tok / f).is_file() for f in TOKENIZER_FILES):
        if tokenizer:
            raise EvalConfigError(
                f"tokenizer={tokenizer} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                "point it at the folder of the tokenizer the model was trained with"
            )
        raise EvalConfigError(
            f"{where}={model} has no tokenizer files ({', '.join(TOKENIZER_FILES)}), e.g. a "
            "model trained from random weights and exported without one; pass "
            "tokenizer=<folder of the tokenizer its data was preprocessed with>, or copy that "
            f"tokenizer's files into {model} (AutoTokenizer.from_pretrained(<folder>)"
            f".save_pretrained('{model}'))"
        )


def _auto_map(path: Path, key: str) -> str | None:
    """The module file ``path``'s ``auto_map[key]`` names (``None``: transformers has the class)."""
    import json

    if not path.is_file():
        return None
    entry = (json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {}).get(key)
    if isinstance(entry, list):  # AutoTokenizer: [slow, fast]
        entry = next((e for e in entry if e), None)
    return entry.split(".")[0] + ".py" if entry else None


def check_remote_code(model: str, tokenizer: str | None, trust_remote_code: bool) -> None:
    """Refuse, before anything loads, a model or tokenizer whose class is the folder's own code
    (``auto_map``, e.g. Baichuan) unless ``hf.trust_remote_code=true`` and the code is there."""
    tok = Path(tokenizer) if tokenizer else Path(model)
    needs = [
        (Path(model), "model", _auto_map(Path(model) / "config.json", "AutoModelForCausalLM")),
        (tok, "tokenizer", _auto_map(tok / "tokenizer_config.json", "AutoTokenizer")),
    ]
    for folder, what, module in needs:
        if module is None:
            continue
        if not (folder / module).is_file():
            raise EvalConfigError(
                f"the {what} in {folder} is the release's own code ({module}, named by auto_map), "
                f"which the folder lacks; copy {module} (and the files it imports) of the "
                "release into it, then set hf.trust_remote_code=true"
            )
        if not trust_remote_code:
            raise EvalConfigError(
                f"the {what} in {folder} is the release's own code ({module}); transformers runs "
                "it only with hf.trust_remote_code=true — set it if you trust that code"
            )


def register() -> None:
    """Register the schema as ``evaluate_schema`` in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="evaluate_schema", node=EvalConfig)

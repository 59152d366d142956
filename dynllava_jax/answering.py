"""Answering a questions file in LLaVA's ``model_vqa`` format (what ``infer.py --questions`` runs).

Questions: one JSON object a line, ``{"question_id", "text", "image"?}`` (``image`` relative
to the image folder; without it the question is text-only). Answers: one JSON object a line,
``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}``.

- **Nothing lost.** Each answer is appended and flushed as it is made. A rerun with the same
  answers file skips the question_ids already in it. A question that cannot be answered
  (a bad line, a missing or corrupt image, a prompt that does not fit) is skipped, named on
  stderr as ``error: FILE:LINE: ...`` and counted; the run goes on. At the end the answers
  file is rewritten (atomically) to hold each answer once, in question order.
- **Fast.** Questions are sorted by prompt length into batches of one shape (a short batch
  is padded with copies), prompts are padded to a few length buckets
  (``inference.prompt_bucket``), and the next batch's images are loaded on a thread while the
  device works. A question's sampling key comes from its line in the file, so its answer
  does not depend on its batch, its share or a resume.
- **Shared.** ``share=(k, n)`` answers the k-th of n shares (LLaVA's ``--num-chunks``/
  ``--chunk-idx``: ``get_chunk``), and ``merge_answers`` joins the shares' files.
  ``answer_together`` is the multi-process form: every process answers its share into a part
  file, all run the same number of batches of the same padded lengths, one merges.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

from .image_processing import ImageLoadError
from .inference import Request, prompt_bucket
from .inputs import InputError


class AnsweringError(ValueError):
    """A problem with the run as a whole (flags, an unreadable answers file): nothing answered."""


@dataclasses.dataclass(frozen=True)
class Question:
    qid: Any            # the question_id as in the file (a number or a string)
    text: str
    image: Optional[str]
    line: int           # 1-based line in the questions file; line - 1 is its sampling key


@dataclasses.dataclass(frozen=True)
class Problem:
    line: int
    message: str


@dataclasses.dataclass
class Summary:
    questions: int = 0   # lines (questions or bad lines) in this share
    answered: int = 0    # answered by this run
    resumed: int = 0     # already in the answers file
    skipped: list = dataclasses.field(default_factory=list)  # [Problem]
    batches: int = 0     # batches run (padding batches included)

    def line(self, answers: Path) -> str:
        """The run's final summary line."""
        s = f"{self.answered} answered, {self.resumed} already in {answers}, {len(self.skipped)} skipped"
        return s + " (named in the error: lines above)" if self.skipped else s


# -- reading -------------------------------------------------------------------------

def read_questions(path: str | Path) -> list[Question | Problem]:
    """One ``Question`` or ``Problem`` per non-blank line of ``path``, in file order.

    Raw bytes are read, so a line that is not UTF-8 is that line's problem only."""
    entries: list[Question | Problem] = []
    first_line: dict = {}
    for n, raw in enumerate(Path(path).read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        entry = _parse_question(raw, n)
        if isinstance(entry, Question):
            key = _qid_key(entry.qid)
            if key in first_line:
                entry = Problem(n, f"duplicate question_id {entry.qid!r} (first on line "
                                   f"{first_line[key]}): the answers could not be told apart")
            else:
                first_line[key] = n
        entries.append(entry)
    return entries


def _qid_key(qid):
    return (type(qid).__name__, qid)  # 3 and "3" are different ids, as in JSON


def _parse_question(raw: bytes, n: int) -> Question | Problem:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Problem(n, f"not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
    if n == 1:
        text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return Problem(n, f"not JSON ({e.msg}, column {e.colno})")
    if not isinstance(rec, dict):
        return Problem(n, f"expected a JSON object {{question_id, text, image}}, got {_kind(rec)}")
    if "question_id" not in rec:
        return Problem(n, "no question_id")
    qid = rec["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        return Problem(n, f"question_id must be a number or a string, got {_kind(qid)}")
    if not isinstance(rec.get("text"), str):
        return Problem(n, "no text" if "text" not in rec else
                       f"text must be a string, got {_kind(rec['text'])}")
    image = rec.get("image")
    if image is not None and not isinstance(image, str):
        return Problem(n, f"image must be a path (a string) in --image-folder, got {_kind(image)}")
    return Question(qid, rec["text"], image or None, n)


def _kind(v) -> str:
    return "null" if v is None else f"{type(v).__name__} {json.dumps(v)[:40]}"


def read_answers(path: str | Path) -> tuple[list[dict], bool]:
    """The answer records of ``path`` and whether its last line was torn (a run killed
    mid-write; that line is dropped). Any other bad line is an ``AnsweringError``."""
    path = Path(path)
    if not path.exists():
        return [], False
    if not path.is_file():
        raise AnsweringError(f"answers file {path} is not a file")
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, torn = [], False
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict) or "question_id" not in rec:
                raise ValueError("no question_id")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if n == len(lines) and not data.endswith(b"\n"):
                torn = True
                continue
            raise AnsweringError(f"{path}:{n}: not an answer record ({e}); is this an answers "
                                 "file?") from None
        records.append(rec)
    return records, torn


# -- shares --------------------------------------------------------------------------

def split_list(lst: Sequence, n: int) -> list[Sequence]:
    """LLaVA's ``split_list``: chunks of ``ceil(len / n)`` (so there may be fewer than n)."""
    size = max(1, math.ceil(len(lst) / n))
    return [lst[i:i + size] for i in range(0, len(lst), size)]


def get_chunk(lst: Sequence, n: int, k: int) -> Sequence:
    """LLaVA's ``get_chunk``: the k-th of ``split_list(lst, n)``; empty where that has none."""
    if not 0 <= k < n:
        raise ValueError(f"chunk index {k} is not in [0, {n})")
    chunks = split_list(lst, n)
    return chunks[k] if k < len(chunks) else lst[:0]


def part_path(answers: str | Path, k: int, n: int) -> Path:
    """Where share k of n writes its answers in a multi-process run (``A.part-K-of-N.jsonl``)."""
    answers = Path(answers)
    return answers.with_name(f"{answers.stem}.part-{k}-of-{n}{answers.suffix}")


# -- writing -------------------------------------------------------------------------

def _write_atomically(path: Path, records: Sequence[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _in_order(records: Sequence[dict], order: Sequence) -> list[dict]:
    """Each question_id's first record, in ``order``; records of other ids after, as found."""
    first: dict = {}
    for rec in records:
        first.setdefault(_qid_key(rec["question_id"]), rec)
    out = [first.pop(_qid_key(q)) for q in order if _qid_key(q) in first]
    return out + list(first.values())


def merge_answers(part_paths: Sequence[str | Path], out_path: str | Path,
                  questions_path: str | Path | None = None) -> int:
    """Join answers files into ``out_path`` (written atomically); returns the answers written.

    With ``questions_path`` they come in its question order (answers to ids it does not hold
    after them), else in the order of the parts. A question_id answered twice keeps its first
    answer. A part's torn last line (a killed run) is dropped."""
    out_path = Path(out_path)
    records = []
    for p in part_paths:
        if not Path(p).is_file():
            raise AnsweringError(f"answers file not found: {p}")
        records += read_answers(p)[0]
    order = [r["question_id"] for r in records]
    if questions_path is not None:
        if Path(questions_path).resolve() == out_path.resolve():
            raise AnsweringError(f"the merged answers file {out_path} is the questions file")
        order = [q.qid for q in read_questions(questions_path) if isinstance(q, Question)]
    merged = _in_order(records, order)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out_path, merged)
    return len(merged)


# -- answering -----------------------------------------------------------------------

class Console:
    """stderr for a run: a progress bar, and ``error:`` lines that always start a line."""

    def __init__(self, stream: TextIO | None = None, progress: bool = True):
        self.stream = stream or sys.stderr
        self.progress = progress
        self.bar = None

    def open_bar(self, total: int) -> None:
        if self.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="answering", unit="q", file=self.stream)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def say(self, line: str) -> None:
        if self.bar is None:
            print(line, file=self.stream, flush=True)
        elif _isatty(self.stream):
            self.bar.write(line, file=self.stream)  # clears the bar, writes, redraws it
        else:  # a log file: end the bar's line first, so that `grep ^error:` finds this one
            self.stream.write(f"\n{line}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclasses.dataclass
class _Item:
    q: Question
    length: int  # prompt tokens, image slots included


def _todo(model, entries: Sequence, answered: set, max_new_tokens: int, image_folder):
    """(items to answer, problems) of a share: answered ones dropped, over-long ones refused."""
    limit = model.max_prompt_tokens(max_new_tokens)
    items, problems = [], []
    for e in entries:
        if isinstance(e, Problem):
            problems.append(e)
            continue
        if _qid_key(e.qid) in answered:
            continue
        path = str(Path(image_folder) / e.image) if e.image is not None else None
        n = model.prompt_length(Request(e.text, path))
        if n > limit:
            problems.append(Problem(e.line, f"prompt of {n} tokens (image included) does not fit: "
                                            f"the model holds {limit + max_new_tokens} positions "
                                            f"and {max_new_tokens} are reserved for the answer"))
        else:
            items.append(_Item(e, n))
    return items, problems


def _batches(items: list[_Item], batch_size: int) -> list[list[_Item]]:
    """Sorted by prompt length (then line), cut into batches: similar lengths share a bucket."""
    items = sorted(items, key=lambda it: (it.length, it.q.line))
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def _answered_ids(path: Path) -> set:
    records, _ = read_answers(path)
    return {_qid_key(r["question_id"]) for r in records}


@dataclasses.dataclass
class Plan:
    """What a share will do, decided from the files as they are before any answer is written."""

    entries: list        # the share's questions and bad lines, in file order
    items: list          # [_Item] to answer
    problems: list       # [Problem] found before answering
    resumed: int         # questions already in the answers file
    batches: list        # [[_Item | None]] in the order they run (None: a lockstep padding slot)
    pad_to: list         # per batch: the padded prompt length (None: its own bucket)


def plan_share(model, questions: str | Path, answers: str | Path, opts, *,
               image_folder: str | Path | None = None, batch_size: int = 8,
               share: tuple[int, int] = (0, 1), peers: Sequence[str | Path] | None = None) -> Plan:
    """The batches share ``share = (k, n)`` will run (see ``answer_questions``)."""
    questions, answers = Path(questions), Path(answers)
    k, n = share
    entries = read_questions(questions)
    mine = get_chunk(entries, n, k)
    if image_folder is None:
        with_image = next((e for e in mine if isinstance(e, Question) and e.image), None)
        if with_image is not None:
            raise AnsweringError(f"{questions}:{with_image.line}: image questions need --image-folder")
    answered = _answered_ids(answers)
    items, problems = _todo(model, mine, answered, opts.max_new_tokens, image_folder)
    resumed = sum(1 for e in mine if isinstance(e, Question) and _qid_key(e.qid) in answered)
    batches = _batches(items, batch_size)
    pad_to: list[Optional[int]] = [None] * len(batches)
    if peers is not None:
        batches, pad_to = _lockstep(model, entries, peers, k, n, opts, image_folder, batch_size)
    return Plan(list(mine), items, problems, resumed, batches, pad_to)


def answer_questions(model, questions: str | Path, answers: str | Path, opts, *,
                     image_folder: str | Path | None = None, batch_size: int = 8,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     share: tuple[int, int] = (0, 1), peers: Sequence[str | Path] | None = None,
                     console: Console | None = None,
                     on_answer: Callable[[Question, dict], None] | None = None,
                     plan: Plan | None = None, barrier: Callable[[], None] | None = None) -> Summary:
    """Answer share ``share = (k, n)`` of the questions file into ``answers`` (see the module
    docstring); ``model`` is an ``inference.Llava``, ``opts`` its ``GenOptions``.

    ``peers``: the answers files of all n shares (``answers`` among them) in a run whose
    processes must run in lockstep: every share then runs the same number of batches, batch
    i of every share padded to the same prompt length. The plan reads every peer's file, so
    ``barrier()`` (when given) is called after planning and before the first write; ``plan``
    gives one made by ``plan_share`` instead. ``on_answer(question, answer)`` is called as
    each answer is written. ``AnsweringError``: nothing could be answered."""
    questions, answers = Path(questions), Path(answers)
    console = console or Console()
    if plan is None:
        plan = plan_share(model, questions, answers, opts, image_folder=image_folder,
                          batch_size=batch_size, share=share, peers=peers)
    if barrier is not None:
        barrier()
    mine, items, batches, pad_to = plan.entries, plan.items, plan.batches, plan.pad_to
    summary = Summary(questions=len(mine), skipped=list(plan.problems), resumed=plan.resumed)
    for p in plan.problems:
        console.say(f"error: {questions}:{p.line}: {p.message}")
    if summary.resumed:
        console.say(f"resuming: {summary.resumed} of the {len(mine)} questions are already "
                    f"answered in {answers}")

    records, torn = read_answers(answers)
    answers.parent.mkdir(parents=True, exist_ok=True)
    if torn:  # drop the torn line, or the next answer would be glued to it
        _write_atomically(answers, records)
    order = [e.qid for e in mine if isinstance(e, Question)]
    run = _Runner(model, opts, image_folder, batch_size, temperature, top_p, seed)
    console.open_bar(len(items))
    try:
        with answers.open("a") as f, ThreadPoolExecutor(1) as loader:
            # The next batch's images load on the thread while this one runs on the device.
            pending = loader.submit(run.load, batches[0]) if batches else None
            for i in range(len(batches)):
                loaded = pending.result()
                pending = loader.submit(run.load, batches[i + 1]) if i + 1 < len(batches) else None
                for q, problem in run.answer(loaded, pad_to[i]):
                    if problem is not None:
                        summary.skipped.append(Problem(q.line, problem))
                        console.say(f"error: {questions}:{q.line}: {problem}")
                        continue
                    ans = run.answers.pop(q.line)
                    f.write(json.dumps(_record(q, ans, model)) + "\n")
                    f.flush()
                    summary.answered += 1
                    if on_answer is not None:
                        on_answer(q, ans)
                os.fsync(f.fileno())
                summary.batches += 1
                console.update(sum(1 for it in batches[i] if it is not None))
    finally:
        console.close()
    # Every answer once, in question order; a kill before this leaves the appended file,
    # which is what a resume reads.
    records, _ = read_answers(answers)
    _write_atomically(answers, _in_order(records, order))
    return summary


def _record(q: Question, ans: dict, model) -> dict:
    return {"question_id": q.qid, "prompt": q.text, "text": ans["text"],
            "answer_id": uuid.uuid4().hex, "model_id": model.path.name,
            "metadata": {k: v for k, v in ans.items() if k != "text"}}


class _Runner:
    """Loads a batch's images (on the loader thread) and answers it (on the main one)."""

    def __init__(self, model, opts, image_folder, batch_size, temperature, top_p, seed):
        self.model, self.opts, self.folder = model, opts, image_folder
        self.batch_size, self.temperature, self.top_p, self.seed = batch_size, temperature, top_p, seed
        self.answers: dict[int, dict] = {}

    def load(self, batch: list[_Item | None]) -> list[tuple[Question, Any]]:
        """(question, pixels | None | ImageLoadError) per real question of the batch."""
        out = []
        for it in batch:
            if it is None:  # a padding slot of a lockstep run
                continue
            if it.q.image is None:
                out.append((it.q, None))
                continue
            try:
                out.append((it.q, self.model.images.load(Path(self.folder) / it.q.image)))
            except ImageLoadError as e:
                out.append((it.q, e))
        return out

    def answer(self, loaded, pad_to) -> list[tuple[Question, str | None]]:
        """(question, None if answered else why not) for each loaded question, in order."""
        result = [(q, str(px)) for q, px in loaded if isinstance(px, ImageLoadError)]
        good = [(q, px) for q, px in loaded if not isinstance(px, ImageLoadError)]
        try:
            self._run(good, pad_to)
            return result + [(q, None) for q, _ in good]
        except (InputError, ValueError, OSError) as e:
            if len(good) <= 1:
                return result + [(q, str(e)) for q, _ in good]
        # Something in the batch broke it: answer one by one, skipping the ones that fail
        # (pre-checked questions do not get here; a lockstep run would then lose step).
        for q, px in good:
            try:
                self._run([(q, px)], pad_to)
                result.append((q, None))
            except (InputError, ValueError, OSError) as e:
                result.append((q, str(e)))
        return result

    def _run(self, good, pad_to) -> None:
        reqs = [Request(q.text, q.image, px) for q, px in good]
        keys = [q.line - 1 for q, _ in good]
        if not reqs:  # every question of this batch failed; a lockstep run still runs it
            if pad_to is None:
                return
            reqs, keys = [Request("")], [0]
        # A short batch is padded with copies of its last request: it reuses the compiled shape.
        pad = self.batch_size - len(reqs)
        reqs, keys = reqs + reqs[-1:] * pad, keys + keys[-1:] * pad
        answers = self.model.answer(reqs, self.opts, temperature=self.temperature,
                                    top_p=self.top_p, seed=self.seed, keys_from=keys, pad_to=pad_to)
        for (q, _), ans in zip(good, answers):
            self.answers[q.line] = ans


def _lockstep(model, entries, peers, k, n, opts, image_folder, batch_size):
    """Every share's batches (from every share's answers file), padded to the same count;
    returns (this share's batches, the prompt length of each step)."""
    if len(peers) != n:
        raise AnsweringError(f"{len(peers)} answers files for {n} shares")
    plans = []
    for j in range(n):
        share = get_chunk(entries, n, j)
        items, _ = _todo(model, share, _answered_ids(Path(peers[j])), opts.max_new_tokens,
                         image_folder)
        plans.append(_batches(items, batch_size))
    steps = max(len(p) for p in plans)
    limit = model.max_prompt_tokens(opts.max_new_tokens)
    pad_to = [prompt_bucket(max([it.length for p in plans if i < len(p) for it in p[i]]), limit)
              for i in range(steps)]
    batches = plans[k] + [[None]] * (steps - len(plans[k]))
    return batches, pad_to


def answer_together(model, questions: str | Path, answers: str | Path, opts, *,
                    process: tuple[int, int], barrier: Callable[[], None], **kw) -> Summary:
    """A multi-process job answers one file: process k of n answers its share into
    ``part_path(answers, k, n)`` in lockstep with the others; ``barrier()`` (e.g.
    ``jax.experimental.multihost_utils.sync_global_devices``) is called once every process
    has planned and once all have answered, and then process 0 merges the parts into
    ``answers`` in question order."""
    k, n = process
    parts = [part_path(answers, j, n) for j in range(n)]
    summary = answer_questions(model, questions, parts[k], opts, share=process, peers=parts,
                               barrier=barrier, **kw)
    barrier()
    if k == 0:
        merge_answers(parts, answers, questions)
    return summary

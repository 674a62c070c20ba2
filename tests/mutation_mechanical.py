"""Mechanical mutation check: mutants nobody chose, over every line of every update and loss function.

tests/mutation_check.py applies a list of hand-written bugs. This one generates its mutants from the code: for each
function named in TARGETS it walks the syntax tree and, at every place an operator applies, writes one mutant:
  term      a + b → a, a + b → b, a - b → a, a * b → a, a * b → b, a / b → a  (a term or factor dropped)
  sign      a + b ↔ a - b, a * b ↔ a / b, -a → a, a ** b → a ** -b
  compare   < ↔ <=, > ↔ >=, == ↔ !=
  swap      f(a, b, ...) → f(b, a, ...) (neighbouring positional arguments)
  state     s ↔ s_next, s_n ↔ s_next_n, states ↔ next_states, ... (a name read where its partner belongs)
  index     x[k] → x[k + 1] (or k - 1), x[:-1] ↔ x[1:], x[:k] ↔ x[k:]
  reduce    .min( ↔ .max(, .sum( ↔ .mean(, torch.min ↔ torch.max
  boolean   True ↔ False, `not x` → x
Each mutant replaces only its expression's text in a copy of the repository, then runs the in-process tests that
can see that script (`pytest -x -m "not script and not learning"` on its test files, tests/test_update_steps.py
first) in a child process; a failing test, a crash or a timeout kills it.
A mutant that leaves the code byte-identical or does not compile is skipped.

    python tests/mutation_mechanical.py                    # every target; the survivors and the score at the end
    python tests/mutation_mechanical.py --only opal_cql    # targets whose "file:function" starts with this
    python tests/mutation_mechanical.py --list             # count the mutants per target; run nothing
    python tests/mutation_mechanical.py --jobs 2           # two mutants at a time (one thread each)

Results go to --out (JSON lines, one per mutant: target, line, kind, the mutated text, killed or not), so an
interrupted check resumes where it stopped. Survivors judged equivalent (after reading each) match a rule of
EQUIVALENT_RULES, printed with its reason.
"""

import argparse
import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# every update, loss and the functions whose numbers they consume: "file:function" or "file:Class.method"
TARGETS = [
    # opal_vae.py: Eq. (1), its step, the BC fine-tuning step and batches, the relabeller, the slicer
    "opal_vae.py:window_starts", "opal_vae.py:window_rows", "opal_vae.py:gaussian_head",
    "opal_vae.py:gaussian_log_prob", "opal_vae.py:gaussian_kl", "opal_vae.py:beta_vae_loss",
    "opal_vae.py:vae_update", "opal_vae.py:primitive_bc_loss", "opal_vae.py:relabelled_batch",
    "opal_vae.py:primitive_finetune_update", "opal_vae.py:action_mse", "opal_vae.py:encode_windows",
    "opal_vae.py:Encoder.forward", "opal_vae.py:Prior.forward", "opal_vae.py:PrimitivePolicy.forward",
    # opal_cql.py: the relabelling into high-level transitions, the task reward, the latent box, CQL's step
    "opal_cql.py:relabel", "opal_cql.py:task_rewards", "opal_cql.py:backup_discounts", "opal_cql.py:latent_box",
    "opal_cql.py:TanhGaussianPolicy.forward", "opal_cql.py:TanhGaussianPolicy.log_prob", "opal_cql.py:Critics.forward",
    "opal_cql.py:CQL.update", "opal_cql.py:CQL.gradient_step", "opal_cql.py:HierarchicalPolicy.__call__",
    "opal_cql.py:ValueNetwork.forward", "opal_cql.py:IQL.update", "opal_cql.py:IQL.gradient_step",
    # opal_fewshot_il.py: relabelling the demonstrations, their box, the imitation and fine-tuning steps
    "opal_fewshot_il.py:relabel_demonstrations", "opal_fewshot_il.py:demonstration_box",
    "opal_fewshot_il.py:task_policy_nll", "opal_fewshot_il.py:imitation_update",
    "opal_fewshot_il.py:pick_demonstrations",
    # opal_online_sac.py: the semi-MDP step, SAC's step, the start from the prior
    "opal_online_sac.py:smdp_step", "opal_online_sac.py:SAC.penalty", "opal_online_sac.py:SAC.gradient_step",
    "opal_online_sac.py:start_from_prior",
    # opal_mt_transfer.py: GAE, PPO's losses and update, the schedule, the rollout, the statistics, the choices
    "opal_mt_transfer.py:generalized_advantages", "opal_mt_transfer.py:clipped_surrogate_loss",
    "opal_mt_transfer.py:clipped_value_loss", "opal_mt_transfer.py:ppo_update",
    "opal_mt_transfer.py:annealed_learning_rate", "opal_mt_transfer.py:collect_rollout",
    "opal_mt_transfer.py:RunningNormalizer.update", "opal_mt_transfer.py:RunningNormalizer.forward",
    "opal_mt_transfer.py:RewardScaler.forward", "opal_mt_transfer.py:ChoiceSpace.__call__",
    "opal_mt_transfer.py:ActorCritic.choice_and_value", "opal_mt_transfer.py:HeldChoicePolicy.eval_action",
    # opal_utils.py: the replay buffer, the evaluation episodes and the normalised score
    "opal_utils.py:ReplayBuffer.add", "opal_utils.py:ReplayBuffer.sample", "opal_utils.py:evaluate",
    "opal_utils.py:normalized_score",
]

PARTNERS = [("s", "s_next"), ("s_n", "s_next_n"), ("states", "next_states"), ("q_policy", "q_next"),
            ("log_mu_policy", "log_mu_next"), ("from_policy", "from_next"), ("mean_q", "mean_p"),
            ("log_std_q", "log_std_p"), ("critics", "target_critics"), ("choice", "new_choice"),
            ("values", "next_values"), ("low", "high"), ("returns", "rewards")]
SWAPPED_NAMES = {a: b for pair in PARTNERS for a, b in (pair, pair[::-1])}
REDUCTIONS = {"min": "max", "max": "min", "sum": "mean", "mean": "sum"}

# survivors judged equivalent after reading each one (the rules below match only those read): why no test can tell
SYMMETRIC = "the function is symmetric in the two arguments swapped"
EQUIVALENT_RULES = [  # (kind, original text, mutated text, reason); "" matches any text
    ("swap", "gaussian_log_prob(", "", "N(x; μ, σ) is symmetric in x and μ: (x - μ)² = (μ - x)²"),
    ("swap", "F.mse_loss(mean_a, actions)", "", SYMMETRIC),
    ("swap", "torch.max(", "", SYMMETRIC + " (max)"),
    ("swap", "max(2, size", "", SYMMETRIC + " (max)"),
    ("swap", "min(self.size + rows_added", "", SYMMETRIC + " (min)"),
    ("swap", "np.fmin(closest, distance)", "", SYMMETRIC + " (fmin)"),
    ("swap", "np.clip(action, act_low, act_high)", "", "clip(a, lo, hi) = min(max(a, lo), hi) and max is symmetric"),
    ("boolean", "True", "False", "zero_grad(set_to_none=False): every parameter gets a gradient in every step, so "
                                 "zeros and None give the same Adam step"),
    ("sign", "-1", "1", "dim=-1 and dim=1 are the same axis of these 2-d tensors"),
    ("state", "s", "s_next", "s and s' have the same batch size, device and dtype: only those are read here"),
    ("state", "self.critics", "self.target_critics", "the target critics are a copy: the same ensemble size"),
    ("term", "1e-6", "", "a 10⁻⁶ guard inside a logarithm of 1 - tanh² ≥ 0.002 (log π changes by < 5·10⁻⁴)"),
    ("sign", "1e-6", "", "a 10⁻⁶ guard inside a logarithm of 1 - tanh² ≥ 0.002 (log π changes by < 5·10⁻⁴)"),
    ("term", "1e-8", "", "a 10⁻⁸ guard against dividing by a zero standard deviation"),
    ("sign", "1e-8", "", "a 10⁻⁸ guard against dividing by a zero standard deviation"),
    ("compare", "approx_kl > args.target_kl", "", "> or ≥ differ only when the KL estimate equals the target exactly"),
    ("compare", "> args.clip_coef", "", "> or ≥ differ only when a ratio lies exactly at 1 ± ε"),
    ("compare", "u < 0", "", "at u = 0 the expectile term |τ - 1(u < 0)| u² and its gradient are 0 either way"),
    ("compare", "len(bounds) > 2", "", "with ≥ 2 rows a batch always has at least two bounds, 0 and its size"),
    ("index", 'envs.render()[0]', "", "not equivalent: the video would show the second environment; rendering is "
                                        "not tested in-process (left)"),
]


def equivalent_reason(record: dict):
    for kind, original, mutated, reason in EQUIVALENT_RULES:
        if record["kind"] == kind and original in record["original"] and mutated in record["mutated"]:
            if kind in ("sign", "term") and original in ("-1",) and record["original"] != "-1":
                continue
            if kind == "state" and not record["original"] == original:
                continue
            return reason
    return None


def find_function(tree: ast.Module, qualified: str):
    scope = tree.body
    *classes, name = qualified.split(".")
    for class_name in classes:
        scope = next(node.body for node in scope if isinstance(node, ast.ClassDef) and node.name == class_name)
    return next(node for node in scope if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name)


def variants(node: ast.AST):
    """(kind, replacement node) for every mutation of this one node (its children are mutated separately)."""
    if isinstance(node, ast.BinOp):
        op = type(node.op)
        if op in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            yield "term", node.left
            if op in (ast.Add, ast.Mult):
                yield "term", node.right
        flips = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
        if op in flips:
            yield "sign", ast.BinOp(node.left, flips[op](), node.right)
        if op is ast.Pow:
            yield "sign", ast.BinOp(node.left, ast.Pow(), ast.UnaryOp(ast.USub(), node.right))
    elif isinstance(node, ast.UnaryOp):
        if isinstance(node.op, (ast.USub, ast.Not)):
            yield "sign" if isinstance(node.op, ast.USub) else "boolean", node.operand
    elif isinstance(node, ast.Compare) and len(node.ops) == 1:
        flips = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq}
        if type(node.ops[0]) in flips:
            yield "compare", ast.Compare(node.left, [flips[type(node.ops[0])]()], node.comparators)
    elif isinstance(node, ast.Call):
        positional = [a for a in node.args if not isinstance(a, ast.Starred)]
        if len(positional) == len(node.args):
            for i in range(len(node.args) - 1):
                if ast.dump(node.args[i]) != ast.dump(node.args[i + 1]):
                    args = list(node.args)
                    args[i], args[i + 1] = args[i + 1], args[i]
                    yield "swap", ast.Call(node.func, args, node.keywords)
        if isinstance(node.func, ast.Attribute) and node.func.attr in REDUCTIONS:
            yield "reduce", ast.Call(ast.Attribute(node.func.value, REDUCTIONS[node.func.attr], ast.Load()),
                                     node.args, node.keywords)
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in SWAPPED_NAMES:
        yield "state", ast.Name(SWAPPED_NAMES[node.id], ast.Load())
    elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and node.attr in SWAPPED_NAMES \
            and isinstance(node.value, ast.Name) and node.value.id == "self":
        yield "state", ast.Attribute(node.value, SWAPPED_NAMES[node.attr], ast.Load())
    elif isinstance(node, ast.Subscript):
        index = node.slice
        if isinstance(index, ast.Constant) and isinstance(index.value, int) and not isinstance(index.value, bool):
            shifted = index.value + 1 if index.value >= 0 else index.value - 1
            yield "index", ast.Subscript(node.value, ast.Constant(shifted), node.ctx)
        if isinstance(index, ast.UnaryOp) and isinstance(index.op, ast.USub) and isinstance(index.operand, ast.Constant):
            yield "index", ast.Subscript(node.value, ast.Constant(-index.operand.value - 1), node.ctx)
        if isinstance(index, ast.Slice) and index.step is None and (index.lower is None) != (index.upper is None):
            bound = index.lower if index.lower is not None else index.upper
            flipped = ast.Slice(None, bound) if index.lower is not None else ast.Slice(bound, None)
            yield "index", ast.Subscript(node.value, flipped, node.ctx)
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield "boolean", ast.Constant(not node.value)


def line_offsets(source: str) -> list:
    offsets, total = [0], 0
    for line in source.splitlines(keepends=True):
        total += len(line)
        offsets.append(total)
    return offsets


def mutants_of(path: Path, qualified: str) -> list:
    """Every mutant of one function: dicts with the target, line, kind, original and mutated text, new source."""
    source = path.read_text()
    tree = ast.parse(source)
    function = find_function(tree, qualified)
    offsets = line_offsets(source)
    body_nodes = [node for statement in function.body for node in ast.walk(statement)]
    # (the docstring is not code)
    if function.body and isinstance(function.body[0], ast.Expr) and isinstance(function.body[0].value, ast.Constant):
        docstring = set(map(id, ast.walk(function.body[0])))
        body_nodes = [node for node in body_nodes if id(node) not in docstring]
    found, seen = [], set()
    for node in body_nodes:
        if not hasattr(node, "lineno"):
            continue
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            continue
        for kind, replacement in variants(node):
            start = offsets[node.lineno - 1] + len(source.splitlines(keepends=True)[node.lineno - 1].encode()[
                :node.col_offset].decode())
            end = offsets[node.end_lineno - 1] + len(source.splitlines(keepends=True)[node.end_lineno - 1].encode()[
                :node.end_col_offset].decode())
            original = source[start:end]
            text = ast.unparse(ast.fix_missing_locations(replacement))
            if not isinstance(replacement, (ast.Name, ast.Constant, ast.Attribute, ast.Call, ast.Subscript)):
                text = f"({text})"
            new_source = source[:start] + text + source[end:]
            if new_source == source or (node.lineno, kind, text) in seen:
                continue
            try:
                compile(new_source, str(path), "exec")
            except SyntaxError:
                continue
            seen.add((node.lineno, kind, text))
            found.append({"target": f"{path.name}:{qualified}", "line": node.lineno, "kind": kind,
                          "original": original, "mutated": text, "source": new_source})
    return found


def key_of(mutant: dict) -> str:
    return f"{mutant['target']}:{mutant['line']}:{mutant['kind']}:{mutant['mutated']}"


# the in-process tests that can see a script's code, the step-by-step references first (they fail fastest)
COMMON = ["tests/test_update_steps.py", "tests/test_evaluation.py", "tests/test_networks.py",
          "tests/test_opal_utils.py"]
TESTS = {
    "opal_vae.py": ["tests/test_opal_vae.py"],
    "opal_cql.py": ["tests/test_opal_cql_update.py", "tests/test_opal_cql.py"],
    "opal_fewshot_il.py": ["tests/test_opal_fewshot_il.py"],
    "opal_online_sac.py": ["tests/test_opal_online_sac.py"],
    "opal_mt_transfer.py": ["tests/test_opal_mt_transfer.py"],
    "opal_utils.py": ["tests/test_opal_cql.py", "tests/test_opal_online_sac.py", "tests/test_opal_vae.py",
                      "tests/test_resume.py", "tests/test_cuda_graph.py"],
}
WORKERS = {}  # thread -> its own copy of the repository


def worker_tree() -> Path:
    import threading
    ident = threading.get_ident()
    if ident not in WORKERS:
        tree = Path(tempfile.mkdtemp()) / "opal"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.pt",
                                                                  ".whl", "results", "docs"))
        WORKERS[ident] = tree
    return WORKERS[ident]


def run_one(mutant: dict, timeout: int) -> bool:
    """Killed? The mutant written into this worker's copy of the repository, the in-process tests of its script run
    there (and the original put back)."""
    tree, file = worker_tree(), mutant["target"].split(":")[0]
    original = (tree / file).read_text()
    (tree / file).write_text(mutant["source"])
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not script and not learning", "-p",
               "no:cacheprovider", *COMMON, *TESTS[file]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        return subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=timeout,
                              env=env).returncode != 0
    except subprocess.TimeoutExpired:
        return True
    finally:
        (tree / file).write_text(original)


def worker(shard_file: Path, out: Path, timeout: int):
    """Runs the mutants listed in `shard_file` in this one process: each mutated module is executed into the loaded
    module's namespace (and every name other modules imported from it rebound), the tests run by pytest.main, then
    the original namespace is put back. Saves the ~3 s of importing torch and the simulators per mutant."""
    import importlib
    import signal

    import pytest

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    os.chdir(ROOT)
    modules = {file: importlib.import_module(file[:-3]) for file in TESTS}
    for test_file in {f for files in TESTS.values() for f in files} | set(COMMON):
        importlib.import_module(Path(test_file).stem)  # loaded once; pytest reuses them

    def on_alarm(signum, frame):
        raise TimeoutError("mutant ran past the timeout")

    signal.signal(signal.SIGALRM, on_alarm)
    for line in shard_file.read_text().splitlines():
        mutant = json.loads(line)
        sources = mutant.get("sources") or {mutant["target"].split(":")[0]: mutant["source"]}  # file -> mutated text
        readers = [m for m in list(sys.modules.values())
                   if str(getattr(m, "__file__", None) or "").startswith(str(ROOT))]  # ours: scripts and tests
        originals, imported = {}, []
        for file in sources:
            module = modules[file]
            originals[file] = dict(module.__dict__)
            imported += [(m, name, file) for m in readers if m is not module for name, value in list(vars(m).items())
                         if name in originals[file] and originals[file][name] is value and not name.startswith("__")
                         and not isinstance(value, type(os))]
        tests = list(dict.fromkeys([*COMMON, *(test for file in sources for test in TESTS[file])]))
        try:
            for file, source in sources.items():
                exec(compile(source, str(ROOT / file), "exec"), modules[file].__dict__)
            for reader, name, file in imported:
                setattr(reader, name, modules[file].__dict__[name])
            signal.alarm(timeout)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                code = pytest.main(["-x", "-q", "-m", "not script and not learning", "-p", "no:cacheprovider",
                                    *tests])
            killed = code != 0
        except BaseException:  # the module itself fails to run, or the timeout
            killed = True
        finally:
            signal.alarm(0)
            for file, original in originals.items():
                modules[file].__dict__.clear()
                modules[file].__dict__.update(original)
            for reader, name, file in imported:
                setattr(reader, name, originals[file][name])
        record = {"key": mutant["key"], "target": mutant["target"], "line": mutant["line"], "kind": mutant["kind"],
                  "original": mutant["original"], "mutated": mutant["mutated"], "killed": killed}
        with open(out, "a") as results:
            results.write(json.dumps(record) + "\n")
        print(f"{'killed  ' if killed else 'SURVIVED'} {record['target']}:{record['line']} {record['kind']}: "
              f"{record['original']!r} -> {record['mutated']!r}", file=sys.__stdout__, flush=True)


def run_in_process(mutants: list, jobs: int, out: Path, timeout: int):
    """Runs `mutants` (dicts with key, target, and source or sources {file: text}) in `jobs` worker processes;
    each appends its records to `out` (also used by tests/mutation_check.py --in-process)."""
    shards, workers = Path(tempfile.mkdtemp()), []
    for job in range(jobs):
        shard = shards / f"shard{job}.jsonl"
        shard.write_text("".join(json.dumps(m) + "\n" for m in mutants[job::jobs]))
        workers.append(subprocess.Popen([sys.executable, __file__, "--worker", str(shard), "--out", str(out),
                                         "--timeout", str(timeout)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                        stdout=sys.stdout, stderr=subprocess.DEVNULL))
    for process in workers:
        process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help='targets whose "file:function" starts with this')
    parser.add_argument("--list", action="store_true", help="count the mutants per target; run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at a time")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per mutant (a hang counts killed)")
    parser.add_argument("--in-process", action="store_true",
                        help="run each worker's mutants in one Python process (faster; a subprocess per mutant without)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rerun-survivors", action="store_true", help="run the survivors in --out again")
    parser.add_argument("--out", default=str(ROOT / "results" / "mutation_mechanical.jsonl"),
                        help="results file (JSON lines); mutants already in it are not run again")
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.worker), Path(args.out), args.timeout)
    mutants = []
    for target in TARGETS:
        if target.startswith(args.only):
            file, function = target.split(":")
            found = mutants_of(ROOT / file, function)
            mutants += found
            if args.list:
                print(f"{len(found):4d}  {target}")
    if args.list:
        print(f"{len(mutants)} mutants in {len({m['target'] for m in mutants})} functions")
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            record = json.loads(line)
            if not (args.rerun_survivors and not record["killed"]):
                done[record["key"]] = record
    todo = [m for m in mutants if key_of(m) not in done]
    print(f"{len(mutants)} mutants, {len(mutants) - len(todo)} already in {out}, {len(todo)} to run", flush=True)
    started = time.time()
    if args.in_process and todo:  # --jobs worker processes, each running its share of the mutants in-process
        run_in_process([{**m, "key": key_of(m)} for m in todo], args.jobs, out, args.timeout)
        for line in out.read_text().splitlines():
            record = json.loads(line)
            done[record["key"]] = record
        todo = []

    def test(mutant):
        killed = run_one(mutant, args.timeout)
        record = {"key": key_of(mutant), "target": mutant["target"], "line": mutant["line"], "kind": mutant["kind"],
                  "original": mutant["original"], "mutated": mutant["mutated"], "killed": killed}
        with open(out, "a") as file:
            file.write(json.dumps(record) + "\n")
        print(f"{'killed  ' if killed else 'SURVIVED'} {record['target']}:{record['line']} {record['kind']}: "
              f"{record['original']!r} -> {record['mutated']!r}", flush=True)
        return record

    with ThreadPoolExecutor(args.jobs) as pool:
        for record in pool.map(test, todo):
            done[record["key"]] = record
    current = [done[key_of(m)] for m in mutants]
    survivors = [r for r in current if not r["killed"]]
    equivalent = [r for r in survivors if equivalent_reason(r) and "not equivalent" not in equivalent_reason(r)]
    print(f"\nmechanical mutation score: {len(current) - len(survivors)} of {len(current)} killed "
          f"({len(equivalent)} of the {len(survivors)} survivors judged equivalent; {time.time() - started:.0f} s)")
    for record in survivors:
        reason = equivalent_reason(record)
        judged = reason and "not equivalent" not in reason
        print(f"  {'equivalent' if judged else 'SURVIVOR  '} {record['target']}:{record['line']} {record['kind']}: "
              f"{record['original']!r} -> {record['mutated']!r}" + (f"  ({reason})" if reason else ""))
    sys.exit(1 if len(survivors) > len(equivalent) else 0)


if __name__ == "__main__":
    main()

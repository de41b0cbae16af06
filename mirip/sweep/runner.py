"""The sweep driver: read the cache once, split once per seed, train each group of stacked heads, write results.

    metadata.csv + cache.h5 (loaded once: the union of the grid's feature specs' entries)
      -> per seed: the same split and pairs scripts/train.py would use with that seed
         -> per (feature spec, hidden_dim, projector_dim): the pending heads, stacked (mirip.training.stacked_training)
            -> per finished head: checkpoints/<id>.pt, then results/<id>.json (the "done" mark)
      -> results.csv, summary.md, best.json, heatmap.png

Columns of results.csv: the configuration (every hyperparameter, grid and fixed),
``best_epoch`` (1-based, as the Trainer counts), ``val_acc`` / ``val_loss`` at that
epoch, ``test_acc``, ``spearman`` and ``kendall`` of that epoch's head on the test
split, and ``wall_time_s``: seconds from the start of the head's group until its
result was saved (the heads of a group train together, so their times overlap).

Restarting with the same command skips every configuration whose result file
exists; ``sweep.json`` records what the results depend on, and a restart with
different data or fixed settings is refused rather than mixed into one table
(unless nothing had finished yet, or with ``overwrite``). An interrupt (Ctrl-C)
raises ``SweepInterrupted`` with a one-line account of what was kept.

With ``folds`` K (``scripts/sweep.py --folds K``) each configuration x seed trains K heads: fold k validates
on the k-th of the folds ``mirip.training.folds.fold_rows`` makes of the seed's non-test images (whole groups
with a group column) and trains on the rest; the test split stays as it is. Folds group like seeds: the heads
of one fold share its train/val rows and stack. results.csv gets one row per fold (a ``fold`` column, 1-based),
``splits/seed<S>-fold<k>.json`` which drawings each fold held, and the configurations are ranked by their mean
val accuracy over folds and seeds.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mirip.common.atomic import output_directory, write_atomic
from mirip.common.devices import resolve_device
from mirip.common.plain import json_safe
from mirip.common.tiers import tier_ranks
from mirip.ml.ranking_model import RankingHead
from mirip.store.cache import open_cache
from mirip.store.checkpoint import head_checkpoint, save_checkpoint_file
from mirip.store.fingerprint import RANDOM_WEIGHTS_NOTE, weights_summary
from mirip.sweep.cost import EpochTimer, cost_line, estimate_seconds, head_size
from mirip.training.stacked_training import HeadOutcome, train_group
from mirip.sweep.grid import HYPERPARAMETERS, SweepConfigError, SweepGrid, group_configs
from mirip.training.head_config import HeadConfig
from mirip.sweep.report import aggregate, best_record, choose_best, save_heatmap, summary_markdown
from mirip.sweep.settings import SweepSettings, check_manifest, file_sha256
from mirip.training.bootstrap import BootstrapConfig
from mirip.training.evaluator import Evaluator
from mirip.training.folds import fold_rows
from mirip.training.head_calibration import calibrate_head
from mirip.training.judged_pairs import (all_scores, judged_agreement, judged_training_set, load_judged_pairs,
                                         split_judged, weigh_by_reliability)
from mirip.training.run_data import (RunData, SPLITS, exclusion_note, failed_images, feature_keys, read_metadata,
                                     scaled_features, split_dataset, split_names, split_positions, write_excluded)
from mirip.training.run_intervals import accuracy_interval

RESULT_COLUMNS = (
    ("config_id", "seed") + tuple(h for h in HYPERPARAMETERS if h != "judgment_weight")
    + ("batch_size", "max_epochs", "pairs_per_epoch", "eval_pairs", "pair_balance", "gradient_clip_norm",
       "early_stopping_patience", "scheduler_t_max", "scheduler_eta_min", "train_ratio", "val_ratio", "test_ratio",
       "stratify")
    + ("best_epoch", "epochs_run", "stopped_early", "val_acc", "val_loss", "test_acc", "spearman", "kendall",
       "test_pairs", "wall_time_s", "group_size", "checkpoint", "backbone_weights", "val_acc_low", "val_acc_high")
)
FOLD_COLUMN = "fold"  # results.csv's extra column in a sweep with folds
# results.csv's extra columns in a sweep with judgments: the weight, and the head's agreement with the judged
# pairs inside val and test (as train.py --judgments reports it, mirip.training.judged_pairs.judgments_report).
JUDGED_COLUMNS = ("judgment_weight", "val_judged_agreement", "val_judged_pairs", "test_judged_agreement",
                  "test_judged_pairs", "judged_across_splits")
OUTPUT_FILES = ("results.csv", "summary.md", "best.json", "heatmap.png")


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, by scripts/sweep.py) during a sweep; ``str()`` says what was kept and how to go on."""


class SweepRunner:
    """Runs a ``SweepGrid`` under ``SweepSettings``; ``run()`` returns the finished table and the winner."""

    def __init__(self, grid: SweepGrid, settings: SweepSettings, *, progress: bool = True,
                 log: Optional[Callable[[str], None]] = None,
                 splits: Optional[Dict[int, Dict[str, List[str]]]] = None,
                 excluded: Optional[Dict[str, str]] = None, overwrite: bool = False):
        settings.check()
        settings.check_grid(grid.judgment_weight)
        self.overwrite = overwrite  # replace finished results of a sweep run here with other settings
        # seed -> {split: image names}, made once from the metadata by a multi-cache sweep (mirip.sweep.multi)
        # so that every cache trains and is tested on the same drawings; None: made here, the same way.
        self.fixed_splits = splits
        # name -> reason: metadata rows left out, their images unreadable (a multi-cache sweep passes the
        # union over its caches); None: this cache's own failures (mirip.training.run_data).
        self.given_excluded = excluded
        self.grid, self.settings = grid, settings
        self.out = settings.output_dir
        self.progress = progress
        self.log = log or (lambda msg: tqdm.write(msg))
        self.device = resolve_device(settings.training.device)
        self.configs = grid.configs()
        # What trains and is saved: (configuration, fold); fold None without folds (ids and files as before).
        self.units = [(c, f) for c in self.configs
                      for f in (range(1, settings.folds + 1) if settings.folds else [None])]

    # --- files -------------------------------------------------------------------------------
    @staticmethod
    def unit_id(cfg: HeadConfig, fold: Optional[int] = None) -> str:
        return cfg.config_id if fold is None else f"{cfg.config_id}-fold{fold}"

    def checkpoint_path(self, cfg: HeadConfig, fold: Optional[int] = None) -> str:
        return os.path.join(self.out, "checkpoints", f"{self.unit_id(cfg, fold)}.pt")

    def result_path(self, cfg: HeadConfig, fold: Optional[int] = None) -> str:
        return os.path.join(self.out, "results", f"{self.unit_id(cfg, fold)}.json")

    def finished(self, cfg: HeadConfig, fold: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """The stored result row of a configuration (and fold), or None if it still has to run."""
        path = self.result_path(cfg, fold)
        if not (os.path.isfile(path) and os.path.isfile(self.checkpoint_path(cfg, fold))):
            return None
        with open(path) as f:
            row = json.load(f)["row"]
        if row.get("feature") is None:  # a result from before feature specs trained on the default spec
            row["feature"] = self.spec_of(cfg)
        return row

    # --- data --------------------------------------------------------------------------------
    def spec_of(self, cfg: HeadConfig) -> str:
        """The canonical feature spec a head trains on (its grid value, else the cache's default)."""
        return cfg.feature or self.default_spec

    def _load(self) -> Dict[str, Any]:
        """Metadata and, in one read of the cache, the columns of every entry any spec of the grid names."""
        s = self.settings
        meta_all = read_metadata(s.metadata, s.filename_column, s.tier_column, s.encoding)
        excluded = self.given_excluded
        if excluded is None:
            excluded = failed_images(s.features, meta_all[s.filename_column].astype(str).tolist(), s.strict_images)
        meta = meta_all[~meta_all[s.filename_column].astype(str).isin(excluded)]
        names = meta[s.filename_column].astype(str).tolist()
        with open_cache(s.features) as cache:
            self.default_spec = cache.default_spec
            specs = list(dict.fromkeys(self.spec_of(c) for c in self.configs))
            slices = {spec: cache.entry_slices(spec) for spec in specs}  # refuses a missing entry, listing the bank
            fingerprint = cache.fingerprint
            rows = cache.rows_for(names)
            union = sorted({(sl.start, sl.stop) for spec in specs for sl in slices[spec]})
            by_start = {sl.start: name for name, sl in zip(cache.entries, cache.entry_slices(cache.entries))}
            picked = cache.features(rows, spec=[by_start[a] for a, _ in union])
        offset, where = 0, {}
        for a, b in union:
            where[(a, b)] = offset
            offset += b - a
        by_spec = {}
        for spec in specs:
            cols = np.concatenate([np.arange(where[(sl.start, sl.stop)], where[(sl.start, sl.stop)] + sl.stop - sl.start)
                                   for sl in slices[spec]])
            by_spec[spec] = (torch.from_numpy(np.ascontiguousarray(picked[:, cols])),
                             [sl.stop - sl.start for sl in slices[spec]])
        judged = (load_judged_pairs(s.judgments, names, list(excluded), s.encoding) if s.judgments else None)
        return {"meta": meta, "meta_all": meta_all, "names": names, "by_spec": by_spec, "fingerprint": fingerprint,
                "ranks": tier_ranks(meta, s.tier_column), "specs": specs, "excluded": excluded,
                "judged": judged[0] if judged else None}

    def _datasets(self, data: Dict[str, Any], seed: int, spec: str) -> Dict[Optional[int], Dict[str, Any]]:
        """fold -> the (seed, spec)'s split and pair datasets, built exactly as ``scripts/train.py --seed SEED
        --feature SPEC`` builds them (per-entry scales fitted on the train split); the only fold is None
        without folds, else folds 1..K each validate on one fold of the seed's non-test rows."""
        # The split and pairs depend on the seed and the fixed settings only, not on the head's hyperparameters.
        rc = self.settings.run_config(HeadConfig(1.0, 1, 1, 1.0, 0.0, 0.0, seed), feature=spec)
        splitter = rc.splitter()
        by_split = (self.fixed_splits[seed] if self.fixed_splits is not None
                    else split_names(data["meta_all"], splitter, self.settings.filename_column, data["excluded"]))
        splits = split_positions(by_split, data["names"])
        # Which drawings each split holds, per seed: comparable across sweeps (and across caches).
        write_atomic(os.path.join(self.out, "splits", f"seed{seed}.json"), json.dumps(
            {name: [data["names"][i] for i in splits[name]] for name in SPLITS}, indent=1))
        if not self.settings.folds:
            return {None: self._split_datasets(data, seed, spec, splits, rc, splitter)}
        base = self._run_data(data, spec, splits, rc, splitter)
        pool = np.concatenate([splits["train"], splits["val"]])
        out = {}
        for fold, val_rows in enumerate(fold_rows(base, self.settings.folds, self.settings.group_column, seed), 1):
            fold_splits = {"train": np.sort(np.setdiff1d(pool, val_rows)), "val": val_rows, "test": splits["test"]}
            write_atomic(os.path.join(self.out, "splits", f"seed{seed}-fold{fold}.json"), json.dumps(
                {name: [data["names"][i] for i in fold_splits[name]] for name in SPLITS}, indent=1))
            out[fold] = self._split_datasets(data, seed, spec, fold_splits, rc, splitter)
        return out

    def _run_data(self, data: Dict[str, Any], spec: str, splits: Dict[str, np.ndarray], rc, splitter) -> RunData:
        features, dims = data["by_spec"][spec]
        features, scales = scaled_features(features, dims, spec, rc.feature_norm, splits["train"])
        return RunData(data["meta"], features, data["ranks"], data["names"], data["fingerprint"],
                       splits, spec=spec, entry_dims=dims,
                       feature_norm="entry" if scales else "none", feature_scales=scales,
                       excluded=data["excluded"], split_info=splitter.get_split_info())

    def _split_datasets(self, data: Dict[str, Any], seed: int, spec: str, splits: Dict[str, np.ndarray], rc,
                        splitter) -> Dict[str, Any]:
        run_data = self._run_data(data, spec, splits, rc, splitter)
        device_features = run_data.features.to(self.device)
        datasets = {sp: split_dataset(run_data, sp, device_features, rc.training, train=(sp == "train"))
                    for sp in SPLITS}
        datasets["feature_keys"] = feature_keys(run_data)
        if data["judged"] is not None:  # the judged pairs inside each split; those across splits are counted only
            datasets["judged"], datasets["judged_across"] = split_judged(data["judged"], splits, len(data["names"]))
            if self.settings.judge_reliability:  # fitted on this split's train judgments, as train.py fits them
                weigh_by_reliability(datasets["judged"]["train"], data["ranks"][splits["train"]])
        for sp in ("train", "val"):
            if datasets[sp] is None:
                raise SweepConfigError(f"seed {seed}: the {sp} split is empty; raise --{sp}-ratio")
        return datasets

    # --- per finished head -------------------------------------------------------------------
    def _save(self, outcome: HeadOutcome, test_ds, data: Dict[str, Any], group_size: int, t_group: float,
              datasets: Optional[Dict[str, Any]] = None, feature_keys: Optional[Dict[str, Any]] = None,
              fold: Optional[int] = None) -> Dict:
        cfg = outcome.config
        spec = self.spec_of(cfg)
        rc = self.settings.run_config(cfg, feature=spec)
        metrics: Dict[str, Any] = {}
        head = RankingHead(**outcome.head_config)
        head.load_head_state_dict(outcome.state)
        # Every head (the winner among them) gets its score-to-tier calibration, as scripts/train.py gives it.
        calibrated = calibrate_head(head, datasets or {"test": test_ds}, self.device, splits=("train", "val"))
        if test_ds is not None:
            metrics = Evaluator(head, self.device, calibration=calibrated.calibration).evaluate_detailed(test_ds)
        best = outcome.best_epoch
        val_low, val_high = self._val_interval(head, (datasets or {}).get("val"), data, cfg.seed)
        payload = head_checkpoint(
            state=outcome.state, optimizer_state=outcome.optimizer_state, scheduler_state=outcome.scheduler_state,
            epoch=best, accuracy=outcome.best_val_acc, config=rc.training.to_dict(), head=outcome.head_config,
            fingerprint=data["fingerprint"], backbone=None,
            history={k: v[:best] for k, v in outcome.history.items()}, best_accuracy=outcome.best_val_acc,
            best_epoch=best, epochs_without_improvement=0, best_state=outcome.state, rng_state=outcome.rng_state,
            run_config=rc.to_dict(), **(feature_keys or {}),
            sweep={"config_id": cfg.config_id, **({} if fold is None else {"fold": fold}), "epochs_run": outcome.epochs_run,
                   "stopped_early": outcome.stopped_early, "test_metrics": json_safe(metrics)},
            **calibrated.checkpoint_keys())
        ckpt = self.checkpoint_path(cfg, fold)
        save_checkpoint_file(ckpt, payload)
        tc = rc.training
        row: Dict[str, Any] = {"config_id": cfg.config_id, **cfg.to_dict(), "feature": spec}
        row.update({k: getattr(tc, k) for k in ("batch_size", "max_epochs", "pairs_per_epoch", "eval_pairs",
                                                "pair_balance", "gradient_clip_norm", "early_stopping_patience",
                                                "scheduler_t_max", "scheduler_eta_min")})
        row.update({k: getattr(self.settings, k) for k in ("train_ratio", "val_ratio", "test_ratio", "stratify")})
        row.update({
            "best_epoch": best, "epochs_run": outcome.epochs_run, "stopped_early": outcome.stopped_early,
            "val_acc": outcome.best_val_acc, "val_loss": outcome.best_val_loss,
            "test_acc": metrics.get("accuracy", float("nan")), "spearman": metrics.get("spearman", float("nan")),
            "kendall": metrics.get("kendall", float("nan")), "test_pairs": metrics.get("total_pairs", 0),
            "wall_time_s": time.perf_counter() - t_group, "group_size": group_size,
            "checkpoint": os.path.relpath(ckpt, self.out),
            "backbone_weights": weights_summary(data["fingerprint"])["backbone_weights"],
            "val_acc_low": val_low, "val_acc_high": val_high,
        })
        if fold is not None:
            row[FOLD_COLUMN] = fold
        if datasets is not None and "judged" in datasets:
            row.update(judged_columns(head, datasets))
        # Written last: its presence is what marks the configuration as done.
        write_atomic(self.result_path(cfg, fold), json.dumps(json_safe({"row": row, "history": outcome.history,
                                                                "test_metrics": metrics}), indent=2))
        return row

    def _val_interval(self, head, val_ds, data: Dict[str, Any], seed: int) -> List[float]:
        """The head's val accuracy interval, over the val split's groups when the sweep has a group column: what
        the summary's tie note compares the other configurations against."""
        column = self.settings.group_column
        units = None
        if column and val_ds is not None:
            group_of = dict(zip(data["names"], data["meta"][column].astype(str)))
            units = [group_of[n] for n in val_ds.names]
        return accuracy_interval(head, val_ds, self.device, BootstrapConfig(seed=seed), units)

    # --- the run -----------------------------------------------------------------------------
    def _write_manifest(self, data: Dict[str, Any]) -> None:
        """sweep.json: what the results depend on; a directory holding a sweep with other settings is refused."""
        s = self.settings
        manifest = {"fixed": s.fixed(), "fingerprint": data["fingerprint"], "metadata_sha256": file_sha256(s.metadata),
                    "features": os.path.abspath(s.features), "metadata": os.path.abspath(s.metadata)}
        if s.judgments:  # recorded only when set, so sweeps without judgments continue
            manifest["judgments_sha256"] = file_sha256(s.judgments)
        manifest_path = os.path.join(self.out, "sweep.json")
        finished = glob.glob(os.path.join(self.out, "results", "*.json"))
        note = check_manifest(manifest_path, manifest, len(finished), self.overwrite)
        if note:
            self.log(note)
            self._remove_old_results()
        write_atomic(manifest_path, json.dumps(json_safe({**manifest, "grid": self.grid.to_dict()}), indent=2))

    def _remove_old_results(self) -> None:
        """Delete what a sweep with other settings left here: its results, checkpoints and tables, nothing else."""
        for pattern in ("results/*.json", "checkpoints/*.pt") + OUTPUT_FILES:
            for path in glob.glob(os.path.join(glob.escape(self.out), pattern)):
                os.remove(path)

    def _partition(self) -> tuple:
        """(unit id -> stored row of every finished configuration (and fold), the (config, fold)s still to train)."""
        rows: Dict[str, Dict[str, Any]] = {}
        pending: List[tuple] = []
        for cfg, fold in self.units:
            row = self.finished(cfg, fold)
            if row is None:
                pending.append((cfg, fold))
            else:
                rows[self.unit_id(cfg, fold)] = row
        return rows, pending

    def _announce(self, data: Dict[str, Any], rows: Dict[str, Dict[str, Any]], pending: List[HeadConfig]) -> None:
        dims = ", ".join(f"{spec} ({data['by_spec'][spec][0].shape[1]}-d)" for spec in data["specs"])
        threads = f" ({torch.get_num_threads()} thread(s))" if self.device == "cpu" else ""
        folds = f" x {self.settings.folds} folds" if self.settings.folds else ""
        self.log(f"sweep: {len(self.configs)} configurations ({len(self.grid.seed)} seed(s)){folds}, "
                 f"{len(rows)} already finished, {len(pending)} to train on {self.device}{threads}; "
                 f"{len(data['names'])} images, features {dims}")
        if data["excluded"]:
            self.log(exclusion_note(data["excluded"], write_excluded(self.out, data["excluded"])))

    def _train_pending(self, data: Dict[str, Any], pending: List[tuple], rows: Dict[str, Dict[str, Any]],
                       bar) -> None:
        """Train the pending heads group by group (and fold by fold); each head is saved, and its row put in
        ``rows``, as it finishes."""
        s = self.settings
        epochs = s.training.max_epochs
        done_count = len(rows)
        sizes = {self.unit_id(c, f): self._head_size(data, c) for c, f in pending}
        timer: Optional[EpochTimer] = None
        # Every (seed, spec)'s split and pairs first: a split that cannot form pairs fails before any training.
        per_seed = {(seed, spec): self._datasets(data, seed, spec)
                    for seed, spec in dict.fromkeys((c.seed, self.spec_of(c)) for c, _ in pending)}
        for (seed, spec), by_fold in per_seed.items():
            for fold, datasets in by_fold.items():
                todo = [c for c, f in pending if f == fold and c.seed == seed and self.spec_of(c) == spec]
                for key, cfgs in group_configs(todo).items():
                    bar.set_postfix_str(f"seed {seed}{'' if fold is None else f' fold {fold}'} {spec} "
                                        f"h{key[1]}/p{key[2]} x{len(cfgs)}")
                    t_group = time.perf_counter()

                    def finished(outcome: HeadOutcome, cfgs=cfgs, t_group=t_group, datasets=datasets,
                                 fold=fold) -> None:
                        nonlocal done_count
                        row = self._save(outcome, datasets["test"], data, len(cfgs), t_group, datasets,
                                         datasets["feature_keys"], fold)
                        rows[self.unit_id(outcome.config, fold)] = row
                        done_count += 1
                        bar.update(epochs - outcome.epochs_run)  # epochs it will not need
                        where = "" if fold is None else f" fold {fold}"
                        self.log(f"[{done_count}/{len(self.units)}] {outcome.config.describe()}{where}: best epoch "
                                 f"{row['best_epoch']}/{row['epochs_run']}, val {row['val_acc']:.4f}, "
                                 f"test {row['test_acc']:.4f}, spearman {row['spearman']:.4f}")
                        self._write_tables(rows)

                    timer = timer or EpochTimer(epochs)  # the first group's epoch is timed, once

                    def on_epoch(epoch: int, trained: int, cfgs=cfgs, fold=fold) -> None:
                        bar.update(trained)
                        took = timer.epoch_end(epoch)
                        if took is not None:
                            seconds = estimate_seconds(took, sum(sizes[self.unit_id(c, fold)] for c in cfgs),
                                                       sizes.values(), epochs)
                            self.log(cost_line(len(pending), epochs, seconds, self.device))

                    train_group(cfgs, train_set(datasets, key[4]), datasets["val"], s.training, self.device,
                                optimizer=s.optimizer, on_epoch=on_epoch, on_finished=finished)

    def _head_size(self, data: Dict[str, Any], cfg: HeadConfig) -> int:
        return head_size(int(data["by_spec"][self.spec_of(cfg)][0].shape[1]), cfg.hidden_dim, cfg.projector_dim)

    def run(self) -> Dict[str, Any]:
        os.makedirs(self.out, exist_ok=True)
        data = self._load()
        self._write_manifest(data)
        rows, pending = self._partition()
        self._announce(data, rows, pending)
        bar = tqdm(total=len(pending) * self.settings.training.max_epochs, desc="sweep", unit="head-epoch",
                   disable=not self.progress, dynamic_ncols=True)
        t_start = time.perf_counter()
        try:
            self._train_pending(data, pending, rows, bar)
        except KeyboardInterrupt:
            bar.close()
            raise SweepInterrupted(
                f"interrupted: {len(rows)} of {len(self.units)} configuration(s) finished and kept in {self.out}"
                f"{' (results.csv)' if rows else ''}; run the same command again to continue") from None
        bar.close()
        result = self._write_tables(rows, final=True)
        result.update(trained=len(pending), skipped=len(self.units) - len(pending),
                      wall_time_s=time.perf_counter() - t_start)
        if result.get("best"):
            b = result["best"]
            self.log(f"best on validation: {describe_best(b)} (val {b['val_acc_mean']:.4f}, test {b['test_acc_mean']:.4f}"
                     f", {len(b['seeds'])} seed(s)); outputs in {self.out}: "
                     + ", ".join(f for f in OUTPUT_FILES if os.path.exists(os.path.join(self.out, f))))
        return result

    def _write_tables(self, rows: Dict[str, Dict[str, Any]], final: bool = False) -> Dict[str, Any]:
        """results.csv after every finished head; summary, best and heatmap too once everything is in."""
        ordered = [rows[self.unit_id(c, f)] for c, f in self.units if self.unit_id(c, f) in rows]
        columns = (list(RESULT_COLUMNS) + ([FOLD_COLUMN] if self.settings.folds else [])
                   + (list(JUDGED_COLUMNS) if self.settings.judgments else []))
        table = pd.DataFrame(ordered, columns=columns)
        write_atomic(os.path.join(self.out, "results.csv"), table.to_csv(index=False))
        out: Dict[str, Any] = {"results": table, "output_dir": self.out}
        if not final or table.empty:
            return out
        summary = aggregate(table)
        missing = len(self.units) - len(ordered)
        notes = [f"{len(ordered)} runs of {len(summary)} configurations; cache {self.settings.features}."]
        if self.settings.folds:
            notes.append(fold_note(self.settings.folds, self.settings.group_column))
        if missing:
            notes.append(f"{missing} run(s) of the grid are missing.")
        weights = sorted(set(table["backbone_weights"].astype(str)))
        if "random" in weights:
            notes.append(f"**{RANDOM_WEIGHTS_NOTE[0].upper() + RANDOM_WEIGHTS_NOTE[1:]}.**")
        write_atomic(os.path.join(self.out, "summary.md"), summary_markdown(summary, notes=notes))
        best = choose_best(summary)
        best_json = best_record(best, self.settings, self.settings.features, weights, self.out,
                                chosen_on=fold_note(self.settings.folds, self.settings.group_column)
                                if self.settings.folds else None)
        write_atomic(os.path.join(self.out, "best.json"), json.dumps(json_safe(best_json), indent=2))
        save_heatmap(summary, os.path.join(self.out, "heatmap.png"),
                     title="RANDOM backbone weights (pipeline check, not a trained model)" if "random" in weights else "")
        out.update(summary=summary, best=best_json)
        return out


def train_set(datasets: Dict[str, Any], weight: Optional[float]):
    """The train split's pairs for heads of judgment weight ``weight``: the tier pairs with the split's judged
    pairs mixed in, as ``train.py --judgments J --judgment-weight W`` trains (weight 0 or None: tier pairs only,
    as there)."""
    if not weight or "judged" not in datasets:
        return datasets["train"]
    return judged_training_set(datasets["train"], datasets["judged"]["train"], weight)


def judged_columns(head, datasets: Dict[str, Any]) -> Dict[str, Any]:
    """The head's agreement with the judged pairs inside val and test (decisive pairs; ties counted, not scored)."""
    out: Dict[str, Any] = {"judged_across_splits": datasets["judged_across"]}
    for split in ("val", "test"):
        ds = datasets.get(split)
        agreement = {"agreement": None, "pairs": 0}
        if ds is not None:
            features = ds.image_features().to(next(head.parameters()).device)
            agreement = judged_agreement(all_scores(head, features), datasets["judged"][split])
        out[f"{split}_judged_agreement"] = (float("nan") if agreement["agreement"] is None
                                            else agreement["agreement"])
        out[f"{split}_judged_pairs"] = agreement["pairs"]
    return out


def fold_note(folds: int, group_column: Optional[str]) -> str:
    by = f" (whole {group_column!r} groups)" if group_column else ""
    return (f"Cross-validated: each configuration x seed trained {folds} times, validated on each of {folds} folds "
            f"of the non-test images{by}; ranked by mean validation pairwise accuracy over folds and seeds "
            "(test accuracy is reported, never used).")


def describe_best(best: Dict[str, Any]) -> str:
    c = best.get("config", best)
    return (f"margin={c['margin']:g} hidden={c['hidden_dim']} proj={c['projector_dim']} lr={c['learning_rate']:g} "
            f"dropout={c['dropout']:g} wd={c['weight_decay']:g} feature={c.get('feature')}"
            + ("" if c.get("judgment_weight") is None else f" judgment_weight={c['judgment_weight']:g}"))


def run_sweep(grid: SweepGrid, settings: SweepSettings, **kwargs) -> Dict[str, Any]:
    with output_directory(settings.output_dir):  # a sweep that fails at once leaves no empty directory
        return SweepRunner(grid, settings, **kwargs).run()

"""bench/agent.py, report: the Markdown tables of a run."""

from __future__ import annotations

import os
from pathlib import Path

from agent_memory import SIGNING_STACK  # noqa: E402
from agent_rig import GOALS, SERVED  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _loaded(pid: int) -> bool:
    """Is cryptography's Rust extension mapped into the process?"""
    return "_rust.abi3.so" in Path(f"/proc/{pid}/maps").read_text()


def _signing_stack(ladder: list) -> float:
    """VmRSS MB the protocol v2 signing stack's ladder steps added."""
    total, prev = 0.0, ladder[0][1]
    for grp, cur in ladder[1:]:
        if grp in SIGNING_STACK:
            total += cur["VmRSS"] - prev["VmRSS"]
        prev = cur
    return total


def _f(v: float, nd: int = 3) -> str:
    return f"{v:.{nd}f}"


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def fmt(r: tuple) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    return [fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *[fmt(r) for r in rows]]


def render(res: dict) -> str:
    env = res["env"]
    lines = [f"edgepack agent benchmark — {env['date']}, {env['cpu']} ({env['cpus']} CPUs), "
             f"Python {env['python']}, onnxruntime {env['onnxruntime']}, "
             f"{env['mosquitto']}, {env['threads']} inference thread(s)", ""]
    models = res.get("models", {})
    names = list(models)
    inf = {n: models[n]["inference"] for n in names if "inference" in models[n]}
    if inf:
        g = GOALS["inference_ratio"]
        ns = list(inf)

        def p50(n: str, pas: str, k: str) -> str:
            return _f(inf[n]["latency_ms"][pas][k]["p50_ms"])

        def ratio(n: str, k: str, goal: bool = False) -> str:
            r = inf[n]["ratios"][k]
            return (f"{r['paired']:.3f}x ({r['p50']:.3f}x)"
                    + (f" {_mark(r['paired'] <= g)}" if goal else ""))

        rows = [
            ("goal pass, p50 ms: bare InferenceSession.run", "", *[p50(n, "goal", "bare")
                                                                  for n in ns]),
            ("goal pass, p50 ms: Model.predict (array)", "", *[p50(n, "goal", "predict")
                                                              for n in ns]),
            ("goal pass, p50 ms: Model.run (typed feeds)", "", *[p50(n, "goal", "run")
                                                                for n in ns]),
            ("Model.predict / bare", f"<= {g}x", *[ratio(n, "predict", True) for n in ns]),
            ("Model.run / bare", f"<= {g}x", *[ratio(n, "run", True) for n in ns]),
            ("wrapper pass, p50 ms: the Model's session.run", "",
             *[p50(n, "wrapper", "own_session") for n in ns]),
            ("Model.predict / its own session.run", "",
             *[ratio(n, "predict_vs_own_session") for n in ns]),
            ("Model.run / its own session.run", "", *[ratio(n, "run_vs_own_session")
                                                      for n in ns]),
            ("Model.predict - session.run, p50", "", *[
                f"{inf[n]['wrapper_overhead_us_p50']['predict']:+.1f} us" for n in ns]),
            ("endpoint pass, p50 ms: bare / Client.predict", "", *[
                f"{p50(n, 'endpoint', 'bare')} / {p50(n, 'endpoint', 'endpoint')}" for n in ns]),
            ("endpoint (unix socket, npy) / bare", "", *[ratio(n, "endpoint") for n in ns]),
            ("goal pass calls each / rounds; load avg", "", *[
                f"{inf[n]['latency_ms']['goal']['bare']['runs']} / "
                f"{inf[n]['latency_ms']['goal']['bare']['rounds']}; "
                f"{inf[n]['loadavg_1min'][0]:.1f}->{inf[n]['loadavg_1min'][1]:.1f}" for n in ns]),
        ]
        lines += ["Inference: agent path vs bare session.run (same model file, threads, input; "
                  "interleaved). Ratios: paired (median over rounds of the per-round ratio), "
                  "then ratio of p50s in brackets.", "",
                  *_table(("metric", "goal", *ns), rows), ""]
    tr = res.get("transfer")
    if tr:
        g = GOALS["transfer_ratio"]
        m = tr["median_s"]
        rows = [
            ("raw: mosquitto_pub -f -> mosquitto_sub (live)", "", _f(m["raw_live_s"]), "1.00x"),
            ("raw: mosquitto_sub of one retained message", "", _f(m["raw_retained_s"]),
             f"{m['raw_retained_s'] / m['raw_live_s']:.2f}x"),
            ("agent: desired -> download_started", "", _f(m["desired_to_download_started_s"]),
             ""),
            ("agent: chunk transfer (started -> downloaded)", "", _f(m["chunk_transfer_s"]),
             f"{tr['ratio']['chunks_vs_raw']:.2f}x"),
            ("agent: desired -> downloaded", f"<= {g}x", _f(m["desired_to_downloaded_s"]),
             f"{tr['ratio']['downloaded_vs_raw']:.2f}x "
             f"{_mark(tr['ratio']['downloaded_vs_raw'] <= g)}"),
            ("agent: desired -> verified", "", _f(m["desired_to_verified_s"]),
             f"{tr['ratio']['verified_vs_raw']:.2f}x"),
            ("agent: desired -> installed (health gate incl.)", "",
             _f(m["desired_to_installed_s"]), ""),
        ]
        lines += [f"Transfer: {tr['bundle_bytes'] / 1e6:.1f} MB signed bundle over loopback "
                  f"Mosquitto, {tr['chunks']} chunks of {tr['chunk_size'] // 1024} KiB, window "
                  f"{tr['window']}; median of {tr['reps']} interleaved rounds (host publish "
                  f"{tr['host_publish_s']:.2f}s, not in the figures)", "",
                  *_table(("step", "goal", "seconds", "vs raw live"), rows),
                  "", f"paired per-round ratio desired->downloaded / raw: "
                  f"{tr['paired_ratio_downloaded_vs_raw']:.2f}x",
                  f"VmRSS holding the {tr['bundle_bytes'] / 1e6:.0f} MB model: agent after the "
                  f"{tr['reps']} deployments {tr['agent_rss_after_mb']['VmRSS']:.1f} MB, same agent "
                  f"restarted {tr['agent_rss_after_restart_mb']['VmRSS']:.1f} MB, bare process "
                  f"{tr['bare_rss_same_model_mb']['VmRSS']:.1f} MB"
                  + (f", prototype MALLOC_MMAP_THRESHOLD_ agent after 2 deployments "
                     f"{tr['proto_both_rss_mb']['VmRSS']:.1f} MB" if tr["proto_both_rss_mb"]
                     else ""), ""]
    mem = {n: models[n]["memory"] for n in names if "memory" in models[n]}
    if mem:
        g = GOALS["rss_over_bare_mb"]
        ns = list(mem)
        rows = [("bare process VmRSS", "", *[_f(mem[n]["bare"]["VmRSS"], 1) for n in ns])]
        for k, lab in (("agent_after_install", "agent after install + 20 calls"),
                       ("agent_after_inference_bench", "agent after the inference bench"),
                       ("agent_after_restart", "agent after restart + 20 calls"),
                       ("proto_mmap_threshold", "prototype: MALLOC_MMAP_THRESHOLD_=131072")):
            if all(k in mem[n] for n in ns):
                rows.append((f"{lab}: VmRSS (over bare)", f"<= +{g:g}" if k ==
                             "agent_after_install" else "", *[
                    f"{mem[n][k]['VmRSS']:.1f} (+{mem[n]['over_bare_mb'][k]:.1f})"
                    + (f" {_mark(mem[n]['over_bare_mb'][k] <= g)}" if k == "agent_after_install"
                       else "") for n in ns]))
        rows.append(("agent after install: RssAnon / RssFile", "", *[
            f"{mem[n]['agent_after_install']['RssAnon']:.1f} / "
            f"{mem[n]['agent_after_install']['RssFile']:.1f}" for n in ns]))
        rows.append(("bare: RssAnon / RssFile", "", *[
            f"{mem[n]['bare']['RssAnon']:.1f} / {mem[n]['bare']['RssFile']:.1f}" for n in ns]))
        rows.append(("agent after install: cryptography mapped; report signed by", "", *[
            f"{mem[n]['agent_after_install'].get('cryptography_mapped')}; "
            f"{models[n].get('report_signed_by', '?')[:16]}" for n in ns]))
        lines += ["Memory: agent VmRSS over a bare process holding the same runtime and model (MB)",
                  "", *_table(("metric", "goal", *ns), rows), ""]
        n0 = ns[0]
        ladder = mem[n0]["ladder"]
        rows = []
        for (_, prev), (grp, cur) in zip(ladder, ladder[1:], strict=False):
            label = ("cryptography (exceptions, serialization, ed25519)"
                     if grp == SIGNING_STACK[0] else grp.replace("+", ", "))
            rows.append((label, f"+{cur['VmRSS'] - prev['VmRSS']:.2f}",
                         f"+{cur['RssAnon'] - prev['RssAnon']:.2f}",
                         f"+{cur['RssFile'] - prev['RssFile']:.2f}"))
        total = ladder[-1][1]["VmRSS"] - ladder[0][1]["VmRSS"]
        rest = mem[n0]["over_bare_mb"]["agent_after_install"] - total
        rows.append(("all imports", f"+{total:.2f}", "", ""))
        rows.append(("agent at run time (threads, sockets, SQLite, heap)", f"{rest:+.2f}", "",
                     ""))
        lines += [f"Where it goes ({n0}): RSS after each import, in a bare process holding the "
                  f"model (start {ladder[0][1]['VmRSS']:.1f} MB), in order", "",
                  *_table(("import", "VmRSS MB", "anon", "file"), rows), ""]
        stack = _signing_stack(ladder)
        lines += [f"Protocol v2 signing stack in the agent's process ({n0}, ladder): "
                  f"+{stack:.2f} MB; the agent without it would be "
                  f"+{mem[n0]['over_bare_mb']['agent_after_install'] - stack:.1f} MB over bare."]
        sg = res.get("signer")
        if sg:
            first, last = sg["steps"][0][1], sg["steps"][-1][1]
            lines += [f"The same work in a process of its own (device key loaded, one desired "
                      f"state verified, {SERVED} reports signed): VmRSS {last['VmRSS']:.1f} MB "
                      f"(python alone {first['VmRSS']:.1f}) — what a resident helper would add "
                      f"next to the agent; as a short-lived child per check "
                      f"{sg['child_ms']:.0f} ms wall each (median of {sg['runs']}), on every "
                      f"report."]
        if any("proto_mmap_threshold" in mem[n] for n in ns):
            lines.append("Prototype (agent code unchanged, launched with it in its environment): "
                         "MALLOC_MMAP_THRESHOLD_=131072, as a systemd unit would set it.")
    fails = res.get("failed") or {}
    lines += [f"{k} FAILED: {v}" for k, v in fails.items()]
    return "\n".join(lines).rstrip() + "\n"



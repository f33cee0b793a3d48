"""Known GPU load with phases logged as JSON lines (t = Unix time) to argv[1].

Usage: load.py LOG            the whole sequence
       load.py LOG worker A|B SECONDS   one worker of the two-process phase
"""
import json, os, subprocess, sys, time

LOG = sys.argv[1]

def ev(**kw):
    kw.setdefault("t", time.time()); kw.setdefault("pid", os.getpid())
    with open(LOG, "a") as fh:
        fh.write(json.dumps(kw) + "\n")
    print(json.dumps(kw), flush=True)

def worker(name, seconds):
    import torch
    n = 8192 if name == "A" else 4096
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
    torch.cuda.synchronize()
    ev(event="worker_ready", worker=name)
    end = time.time() + seconds; iters = 0
    while time.time() < end:
        if name == "A":
            for _ in range(8):
                c = a @ b
            torch.cuda.synchronize(); iters += 8
        else:  # 50 % duty, 100 ms period
            p0 = time.time()
            while time.time() - p0 < 0.05:
                c = a @ b; torch.cuda.synchronize(); iters += 1
            time.sleep(max(0.0, 0.1 - (time.time() - p0)))
    ev(event="worker_done", worker=name, iters=iters)

def main():
    ev(event="phase", phase="no_context")
    time.sleep(8)
    ev(event="phase", phase="start")  # CUDA context coming up
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
    torch.cuda.synchronize()
    ev(event="phase", phase="idle")
    time.sleep(10)
    ev(event="phase", phase="matmul_full")
    end = time.time() + 20; it = 0
    t0 = time.perf_counter()
    while time.time() < end:
        for _ in range(10):
            c = a @ b
        torch.cuda.synchronize(); it += 10
    dt = time.perf_counter() - t0
    ev(event="phase_stats", phase="matmul_full", iters=it, tflops=round(2 * 8192**3 * it / dt / 1e12, 1))
    ev(event="phase", phase="matmul_duty50")
    end = time.time() + 20
    while time.time() < end:
        p0 = time.time()
        while time.time() - p0 < 0.05:
            c = a @ b; torch.cuda.synchronize()
        time.sleep(max(0.0, 0.1 - (time.time() - p0)))
    ev(event="phase", phase="memcopy")
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
    end = time.time() + 10; n = 0; t0 = time.perf_counter()
    while time.time() < end:
        dst.copy_(src); torch.cuda.synchronize(); n += 1
    ev(event="phase_stats", phase="memcopy", copies=n, gbps=round(2 * 2 * 2**30 * n / (time.perf_counter() - t0) / 1e9, 1))
    del src, dst
    ev(event="phase", phase="idle2")
    time.sleep(10)
    ev(event="phase", phase="two_procs")
    procs = [subprocess.Popen([sys.executable, __file__, LOG, "worker", w, "25"]) for w in ("A", "B")]
    # B starts 0 s after A; both create their context (~seconds) first.
    rcs = [p.wait() for p in procs]
    ev(event="phase", phase="idle3", worker_rcs=rcs)
    time.sleep(10)
    ev(event="phase", phase="no_context2")  # this process ends: no CUDA context at all

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "worker":
        worker(sys.argv[3], float(sys.argv[4]))
    else:
        main()

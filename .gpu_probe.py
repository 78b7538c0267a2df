import sys, time, torch
dev = sys.argv[1]
n_timed = int(sys.argv[2])
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
def timed(f, n=n_timed):
    for _ in range(3): f()
    sync(); t = time.perf_counter()
    for _ in range(n): f()
    sync(); return round((time.perf_counter() - t) / n * 1e3, 3)
inventory = [(40, 30), (96, 10), (80, 30), (96, 10), (160, 36), (96, 12)]  # SD 1.5, block_num 8: (block, layers)
torch.manual_seed(0)
layers = [0.01 * torch.randn(8, h, h, device=dev) for h, n in inventory for _ in range(n)]
def skew(r):
    s = (r - r.mT) * 0.5
    return s + torch.eye(r.shape[-1], device=dev), s
pre = [skew(r) for r in layers]
def ns(a, s, iters):
    eye = torch.eye(a.shape[-1], device=dev)
    x = eye - s
    e = torch.bmm(s, s)
    for _ in range(iters):
        x = torch.baddbmm(x, x, e)
        e = torch.baddbmm(eye, a, x, alpha=-1)
    return x
by_size = {}
for a, s in pre:
    by_size.setdefault(a.shape[-1], []).append(a)
batched = {h: torch.cat(v) for h, v in by_size.items()}
print("ms per step, all 128 layers:", flush=True)
print(" per-layer bmm (launch reference)", timed(lambda: [torch.bmm(a, a) for a, _ in pre]), flush=True)
print(" per-layer inv_ex", timed(lambda: [torch.linalg.inv_ex(a) for a, _ in pre]), flush=True)
print(" per-layer solve_ex(a, I)", timed(lambda: [torch.linalg.solve_ex(a, torch.eye(a.shape[-1], device=dev).expand_as(a)) for a, _ in pre]), flush=True)
print(" per-layer lu_factor_ex", timed(lambda: [torch.linalg.lu_factor_ex(a) for a, _ in pre]), flush=True)
print(" one inv_ex per block size (pre-batched)", timed(lambda: [torch.linalg.inv_ex(a) for a in batched.values()]), flush=True)
print(" one inv_ex per block size incl. cat", timed(lambda: [torch.linalg.inv_ex(torch.cat(v)) for v in by_size.values()]), flush=True)
for iters in (2, 3):
    print(f" per-layer Newton-Schulz {iters} it", timed(lambda: [ns(a, s, iters) for a, s in pre]), flush=True)
a, s = pre[-1]
ref = torch.linalg.inv(a.double())
for iters in (1, 2, 3):
    print(f" NS {iters} it max error (160-blocks, R ~ 0.01):", float((ns(a, s, iters).double() - ref).abs().max()), flush=True)
print(" inv_ex error:", float((torch.linalg.inv_ex(a)[0].double() - ref).abs().max()), flush=True)
if dev == "cuda":
    for backend in ("cusolver", "magma"):
        try:
            torch.backends.cuda.preferred_linalg_library(backend)
            print(f" per-layer inv_ex, {backend}", timed(lambda: [torch.linalg.inv_ex(a) for a, _ in pre]), flush=True)
            print(f" one inv_ex per block size, {backend}", timed(lambda: [torch.linalg.inv_ex(a) for a in batched.values()]), flush=True)
        except Exception as error:
            print(backend, "failed:", error, flush=True)
def ns_checked(a, s, tolerance=3e-4, limit=6):
    eye = torch.eye(a.shape[-1], device=dev)
    x, e = eye - s, torch.bmm(s, s)
    for _ in range(limit):
        norm = float(torch.linalg.matrix_norm(e).max())
        if norm >= 1:
            return torch.linalg.inv_ex(a)[0]
        x = torch.baddbmm(x, x, e)
        if norm <= tolerance:
            return x
        e = torch.baddbmm(eye, a, x, alpha=-1)
    return torch.linalg.inv_ex(a)[0]
print(" per-layer Newton-Schulz with residual checks (a sync each)", timed(lambda: [ns_checked(a, s) for a, s in pre]), flush=True)
print(" its max error (160-blocks):", float((ns_checked(a, s).double() - ref).abs().max()), flush=True)

"""Per-step cost of one style-transfer-like step at 300x450 (VGG-19 features[:29], six captured maps,
backward to the image): weights with gradients (as the reference) vs frozen, channels_last, bf16.

The loss is a sum of mean squares over the maps (not the Gram MSE): the VGG work is the same.
Run: flock -x /tmp/heavy.lock python bench/style_step_probe.py
"""
import time, torch, torchvision
torch.manual_seed(0)
torch.set_num_threads(2)
vgg = torchvision.models.vgg19().features[:29]
X = torch.randn(1,3,300,450)
def step(net, x, cl=False):
    x = x.detach().clone().requires_grad_(True)
    inp = x.contiguous(memory_format=torch.channels_last) if cl else x
    feats=[]; h=inp
    for i,m in enumerate(net):
        h = m(h)
        if i in (0,5,10,19,25,28): feats.append(h)
    l = sum((f.float()**2).mean() for f in feats)
    l.backward()
def bench(name, f, n=3):
    f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    print(name, sorted(ts)[n//2], flush=True)
bench("ref (weights grad)", lambda: step(vgg, X))
for p in vgg.parameters(): p.requires_grad_(False)
bench("frozen", lambda: step(vgg, X))
vcl = vgg.to(memory_format=torch.channels_last)
bench("frozen+CL", lambda: step(vcl, X, True))
def bfstep():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step(vcl, X, True)
bench("frozen+CL+bf16", bfstep)

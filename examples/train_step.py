"""A small MLP regression trained with @fp4compile.train_step: forward, loss, backward and optimizer step
in one decorated function, run with the paper's FP4 recipe. Runs on a CPU in seconds:

    python examples/train_step.py
    FP4COMPILE_DUMP_DIR=dumps python examples/train_step.py   # graphs and report.json per graph
"""

import torch

import fp4compile

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
teacher = torch.nn.Linear(128, 128)


@fp4compile.train_step(config=fp4compile.FP4Config.from_recipe_name("paper"))
def step(x):
    with torch.no_grad():
        target = teacher(x)
    loss = torch.nn.functional.mse_loss(model(x), target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


if __name__ == "__main__":
    for i in range(50):
        loss = step(torch.randn(256, 128))
        if i % 10 == 0 or i == 49:
            print(f"step {i:3d}  loss {loss.item():.4f}")

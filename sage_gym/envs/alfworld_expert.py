"""ALFWorld's hand-coded expert, fixed for the current game files, as a state-based expert.

``alfworld.agents.expert.HandCodedTWAgent`` is the DAgger expert that ALFWorld's own text
agents learn from: it searches receptacles from what it has observed (the walkthrough walks
straight to where the object is) and acts from any state, so it can label the turns of
another agent. As shipped with alfworld 0.4.2 it needs three fixes, made here:

- its task parameters come from ``traj_data.json``, which the released game archive lacks;
  the game folder name ``task_type-Object-MRecep-Parent-scene`` carries the ones it reads;
- its state tracking reacts to ``put``, but the game's command is ``move X to Y``, so after
  the first placement it kept returning the object (pick_two_obj: 10 of 50 won);
- ``go to X`` is not admissible when the agent is already at X, and it then fell back to a
  random command; here it looks at X again (opening it if it is closed) instead.

Its random choices use a generator seeded per episode, so an episode is repeatable.
"""

from __future__ import annotations

import hashlib
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TOGGLE_TASK = "look_at_obj_in_light"
_VERBS = {"heat": ("microwave", "heat"), "cool": ("fridge", "cool"), "clean": ("sinkbasin", "clean")}


def task_params(episode_id: str) -> dict[str, str]:
    """The parameters the expert's policies read, from the game folder name
    (``pick_heat_then_place_in_recep-Egg-None-CounterTop-12`` -> object egg, parent countertop)."""
    import alfworld.gen.constants as constants

    task_type, obj, mrecep, parent, _scene = Path(episode_id).parts[-2].split("-")
    params = {"task_type": task_type, "object_target": obj, "mrecep_target": mrecep, "parent_target": parent,
              "toggle_target": "", "object_sliced": False}
    if task_type == TOGGLE_TASK:  # the last object of the name is the lamp, not a receptacle
        params["toggle_target"], params["parent_target"] = parent, ""
    return {k: v.lower() if isinstance(v, str) and v in constants.OBJECTS else v for k, v in params.items()}


@dataclass(frozen=True)
class ExpertDecision:
    """The expert's next command and a one-sentence reason, written from its own state."""

    action: str
    thought: str


@contextmanager
def _module_random(rng: random.Random):
    """alfworld's expert calls the ``random`` module; route those calls to ``rng`` for the duration."""
    from alfworld.agents.expert import handcoded_expert

    saved = handcoded_expert.random
    handcoded_expert.random = rng
    try:
        yield
    finally:
        handcoded_expert.random = saved


def _move_aware(policy_class: type) -> type:
    """The policy class with state tracking that understands ``move X to Y`` as the placement it is."""

    def update_state_tracking(self, game_state, last_action):
        if last_action.startswith("move "):
            last_action = "put " + last_action[len("move "):]
        return policy_class.update_state_tracking(self, game_state, last_action)

    return type(policy_class.__name__, (policy_class,), {"update_state_tracking": update_state_tracking})


class HandCodedExpert:
    """Follows one episode and proposes the expert's next action from the current state.

    Call ``reset(episode_id, state)`` after the game reset and ``observe(action, state)`` after
    every command sent to the game (whoever chose it); ``decision`` is then the expert's next
    ``ExpertDecision`` (None if it gave up). ``state`` is a textworld game state with ``feedback``,
    ``facts`` and ``admissible_commands``.
    """

    def __init__(self, max_steps: int = 200):
        self.max_steps = max_steps
        self.decision: ExpertDecision | None = None
        self._policy = None
        self._rng = random.Random(0)
        self._last = ""
        self.goal = ""

    def reset(self, episode_id: str, state) -> ExpertDecision | None:
        from alfworld.agents.expert.handcoded_expert_tw import HandCodedTWAgent

        params = task_params(episode_id)
        self._rng = random.Random(int.from_bytes(hashlib.sha256(episode_id.encode()).digest()[:8], "little"))
        policy_class = _move_aware(HandCodedTWAgent().get_task_policy(params))
        self._policy = policy_class(params, max_steps=self.max_steps)
        self._policy.observe(state["feedback"])  # the intro lists the receptacles
        match = re.search(r"Your task is to: (.*?)\.?\s*$", state["feedback"].strip())
        self.goal = match.group(1) if match else ""
        self._last = ""
        self.decision = ExpertDecision("look", self.explain("look"))  # ALFWorld's expert starts so
        return self.decision

    def observe(self, action: str, state) -> ExpertDecision | None:
        """Track the command just played and its outcome; returns the next decision."""
        if self._policy is None:
            raise RuntimeError("call reset() before observe()")
        self._last = action
        self.decision = self._decide(state)
        return self.decision

    def _decide(self, state) -> ExpertDecision | None:
        from alfworld.agents.expert.handcoded_expert import HandCodedAgentFailed, HandCodedAgentTimeout

        policy, admissible = self._policy, state["admissible_commands"]
        try:
            with _module_random(self._rng):
                action = policy.act(state, self._last)
        except (HandCodedAgentFailed, HandCodedAgentTimeout, IndexError, KeyError):
            return None
        here = policy.curr_recep
        if action == f"go to {here}":  # not admissible: look at the place again instead
            action = f"open {here}" if f"open {here}" in admissible else f"examine {here}"
        if action == self._last or action not in admissible:
            # what HandCodedAgent.act does when stuck (its only repeat guard), with a seeded generator
            options = [a for a in admissible if a not in ("help", self._last)] or list(admissible)
            return ExpertDecision(self._rng.choice(options), "I am not sure what to do, so I try something else.")
        return ExpertDecision(action, self.explain(action))

    def explain(self, action: str) -> str:
        """The expert's thought for ``action``: the goal restated (so that a reader of the last turn has it at
        hand) and a short reason from its subgoal and memory. Used for its own moves and for any other
        move, so that both read alike."""
        reason = self._reason(action)
        return f"Goal: {self.goal}. {reason}" if self.goal else reason

    def _reason(self, action: str) -> str:
        p = self._policy
        params = p.task_params
        obj = params["object_target"]
        subgoal = p.subgoals[p.subgoal_idx] if p.subgoal_idx < len(p.subgoals) else {"action": "", "param": ""}
        verb, _, rest = action.partition(" ")
        if action.startswith("go to "):
            place = action[len("go to "):]
            if p.inventory and not p.is_agent_holding_right_object:
                return f"This is not the {obj} I need. I bring it back to {place}."
            if subgoal["action"] == "goto":
                use = next((v for v, (recep, _) in _VERBS.items() if recep in place or recep == subgoal["param"]), "use")
                return f"I have the {obj}. I go to {place} to {use} it."
            target = subgoal["param"] or obj
            if p.obj_cls_to_receptacle_map.get(target) == place:
                return f"I saw a {target} at {place}. I go there."
            if p.inventory and target != obj:
                return f"I have the {obj}. I look for a {target} to put it in: {place} is next."
            return f"I need a {target}. I have not checked {place} yet."
        if verb == "open":
            return f"{rest} is closed. I open it to see inside."
        if verb == "close":
            return f"I close {rest} again."
        thing = rest.split(" ")[0]  # the object class the command names
        if verb == "take":
            return f"There is a {thing} here. I take it."
        if verb == "move":
            return f"I put the {thing} in or on {rest.split(' to ', 1)[-1]}."
        if verb in _VERBS:
            return f"I {verb} the {thing} with {rest.split(' with ', 1)[-1]}."
        if verb == "use":
            return f"I hold the {obj}. I turn on {rest} to look at it."
        if verb == "examine":
            return f"I look at {rest} more closely."
        return "I look around to see where I am."

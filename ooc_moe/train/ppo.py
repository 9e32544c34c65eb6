"""PPO for the MoE agent, in the shape of CleanRL's ``ppo_atari.py`` (Huang et al., 2022).

Same defaults and vocabulary: 8 envs x 128 steps, 4 minibatches, 4 epochs, lr 2.5e-4,
gamma 0.99, GAE lambda 0.95, clip 0.1, clipped value loss, entropy 0.01, value 0.5, max grad
norm 0.5; buffers ``obs, actions, logprobs, rewards, dones, values``; flattened ``b_*``;
losses ``pg_loss, v_loss, entropy_loss``. Where this deviates, and why:

- the learning rate stays at 2.5e-4 (``anneal_lr=False``; ``--anneal_lr`` anneals it linearly
  to 0 over each game, as CleanRL over its whole run): CleanRL anneals over 10M steps, so at
  the few hundred thousand steps of a game on a CPU annealing would halve the average rate
  (measured: README, "The learning check");
- the policy reads a window of ``context_len`` observations, rebuilt for each step from the
  rollout's frames (plus the frames before it) and re-encoded with the current encoder.
  ``minibatches="random"`` (the default) draws CleanRL's random minibatches over all steps and
  environments: each window's newest observation is encoded with the encoder's gradient, its
  older ones come from a no-grad encoding of the rollout's frames made at the start of each
  epoch (the encoder still learns from every frame, as the newest token of its own step);
  the first epoch's are the tokens the rollout encoded (the same parameters), so only its
  ``context_len - 1`` prefix frames per environment are encoded again. In later epochs
  (``older_tokens="recycled"``, the default) they are the newest tokens the epoch before
  encoded (detached: up to ``2 * num_minibatches - 1`` optimizer steps old), so an epoch
  costs CleanRL's encoder work (one forward and backward per step) plus the transformer;
  with ``older_tokens="fresh"`` every frame is encoded again at the start of the epoch (up to
  ``num_minibatches - 1`` steps old), one more encoder forward per frame and epoch but for
  the first minibatch's newest frames (encoded with the gradient at the same parameters,
  their tokens serve as older tokens too). ``minibatches="env"`` draws them by
  *environment* (as CleanRL's ``ppo_atari_lstm.py``): a minibatch is ``num_envs /
  num_minibatches`` environments' whole rollouts, every token of every window with the
  encoder's gradient (``older_tokens`` does nothing there); an agent without a window
  (``context_len == 1``: ``CNNAgent``) always gets random minibatches;
- an agent that routes by game (``env``, ``cohort``) is updated with the game each step was
  *routed* with while acting (the detector's prediction, where a detector is trained), kept
  in ``games``, so rollout and update policies are the same function of the game;
- the MoE auxiliary losses are added to the loss; experts are trained by ``ExpertOptimizer``
  (their gradients live in the expert records), dense parameters by ``torch.optim.Adam``;
  the global gradient norm is clipped over both together (``clip_grad_norm_``) and logged
  before clipping as ``losses/grad_norm`` (mean over the update's minibatches);
- episodes autoreset in the same step (``SameStep``); truncated episodes are not bootstrapped
  (as CleanRL); rewards are clipped to their sign for learning, returns reported raw;
- one policy head of 18 actions serves every game; with ``action_masks`` (``TrainArgs.
  action_mask="legal"``) the logits of the actions outside the played game's minimal action
  set are masked out (as CleanRL, which plays each game with its minimal set), in the
  rollout and the update (the mask of the game each step played, ``buffer.played``) and in
  the evaluation (the evaluated game's);
- a lost life ends the episode *for GAE only* (``life_loss_terminal``, CleanRL's
  ``EpisodicLifeEnv``): the game and the context window go on, returns are whole games.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical

from ..agent import ContextWindows
from ..distributed import average_gradients, sum_over_ranks, world_info
from ..metrics import router_entropy
from ..moe.optim import ExpertOptimizer, clip_grad_norm_

__all__ = ["PPOArgs", "RolloutBuffer", "PPOTrainer", "MINIBATCHES", "OLDER_TOKENS"]

MINIBATCHES = ("random", "env")
OLDER_TOKENS = ("fresh", "recycled")


@dataclass
class PPOArgs:
    num_envs: int = 8            # parallel environments
    num_steps: int = 128         # steps per environment per rollout
    learning_rate: float = 2.5e-4  # Adam learning rate (dense parameters and experts)
    anneal_lr: bool = False      # anneal the learning rate linearly to 0 over each game
    gamma: float = 0.99          # discount
    gae_lambda: float = 0.95     # GAE lambda
    num_minibatches: int = 4     # minibatches per epoch
    minibatches: str = "random"  # "random" steps (CleanRL) or whole rollouts of "env"s
    older_tokens: str = "recycled"  # a window's older tokens, epochs after the first:
                                    # "recycled" (the last epoch's newest) or "fresh" (encoded
                                    # again); random minibatches with a window only
    update_epochs: int = 4       # epochs per update
    norm_adv: bool = True        # normalise advantages per minibatch
    clip_coef: float = 0.1       # surrogate clipping
    clip_vloss: bool = True      # clipped value loss
    ent_coef: float = 0.01       # entropy bonus
    vf_coef: float = 0.5         # value loss coefficient
    max_grad_norm: float = 0.5   # clip the global gradient norm (dense and experts)
    target_kl: float | None = None  # stop the epochs early past this KL
    life_loss_terminal: bool = True  # a lost life ends the episode for GAE (EpisodicLifeEnv)
    # filled in at runtime
    batch_size: int = field(init=False)
    minibatch_size: int = field(init=False)      # steps per minibatch
    envs_per_minibatch: int = field(init=False)

    def __post_init__(self) -> None:
        if self.minibatches not in MINIBATCHES:
            raise ValueError(f"minibatches must be one of {MINIBATCHES}, got "
                             f"{self.minibatches!r} (e.g. --minibatches random)")
        if self.older_tokens not in OLDER_TOKENS:
            raise ValueError(f"older_tokens must be one of {OLDER_TOKENS}, got "
                             f"{self.older_tokens!r} (e.g. --older_tokens fresh)")
        self.batch_size = self.num_envs * self.num_steps
        if self.minibatches == "env" and self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs={self.num_envs} must be divisible by num_minibatches="
                             f"{self.num_minibatches} with minibatches='env' (or use "
                             "--minibatches random)")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"num_envs x num_steps = {self.batch_size} must be divisible by "
                             f"num_minibatches={self.num_minibatches}")
        self.minibatch_size = self.batch_size // self.num_minibatches
        self.envs_per_minibatch = self.num_envs // self.num_minibatches


class RolloutBuffer:
    """One rollout per environment, plus the ``context_len - 1`` frames before it."""

    def __init__(self, args: PPOArgs, obs_shape: tuple, context_len: int, device,
                 token_dim: int = 0) -> None:
        S, N, P = args.num_steps, args.num_envs, context_len - 1
        self.prefix = P
        # on the host, each frame channels last (``[.., C, H, W]`` indexing, HWC in memory):
        # the encoders convert it to floats in that layout several times faster than from
        # the default one, and the update converts every frame once per epoch or more
        c, h, w = obs_shape
        self.frames = torch.zeros((P + S, N, h, w, c), dtype=torch.uint8).permute(0, 1, 4, 2, 3)
        self.starts = torch.ones(P + S, N, dtype=torch.bool)    # frame begins an episode
        self.actions = torch.zeros(S, N, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(S, N, device=device)
        self.rewards = torch.zeros(S, N, device=device)
        self.dones = torch.zeros(S, N, device=device)
        self.values = torch.zeros(S, N, device=device)
        self.games = torch.zeros(S, N, dtype=torch.long, device=device)  # routed with
        self.played = torch.zeros(S, N, dtype=torch.long, device=device)  # the true game
        # with a window, the rollout's encodings of its frames (the first epoch's older tokens)
        self.tokens = torch.zeros(S, N, token_dim, device=device) if P else None

    def roll_prefix(self) -> None:
        """Keep the last frames of this rollout as the prefix of the next one."""
        if self.prefix:
            self.frames[:self.prefix] = self.frames[-self.prefix:].clone()
            self.starts[:self.prefix] = self.starts[-self.prefix:].clone()

    def window_index(self, context_len: int) -> torch.Tensor:
        """``[S, N, T]`` frame indices of each step's window: the last T frames, positions
        before the episode's start replaced by its first frame (as ``ContextWindows`` does)."""
        total, n = self.starts.shape
        idx = torch.arange(total)[:, None].expand(total, n)
        episode_start = torch.where(self.starts, idx, torch.zeros_like(idx)).cummax(0).values
        steps = torch.arange(self.prefix, total)[:, None, None]           # [S, 1, 1]
        back = torch.arange(context_len - 1, -1, -1)[None, None, :]      # [1, 1, T]
        window = steps - back                                             # [S, 1, T]
        return torch.maximum(window, episode_start[self.prefix:, :, None])  # [S, N, T]


class PPOTrainer:
    """Collects rollouts from a vectorised env and updates an agent with PPO."""

    def __init__(self, agent: nn.Module, args: PPOArgs, *, planner=None,
                 detector_trainer=None, detector_updates: int = 8,
                 data_parallel: bool = False, action_masks: torch.Tensor | None = None
                 ) -> None:
        """``detector_trainer``: trained online, ``detector_updates`` minibatches per rollout
        from the frames the rollouts add to its buffer. ``data_parallel``: this is one rank of
        a ``torch.distributed`` job (each rank its own environments, the agent's dense
        parameters replicated, its experts sharded): gradients are averaged over the ranks
        (``average_gradients``), the clipped norm and the early stop on ``target_kl`` are
        the ranks' together, and evaluations step until every rank is done.
        ``action_masks``: ``[games, actions]`` bool, the actions the policy may take in each
        game (None: all of them)."""
        self.agent, self.args, self.data_parallel = agent, args, data_parallel
        self.device = next(agent.parameters()).device
        self.dense_opt = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
        self.expert_opt = (ExpertOptimizer(agent.store, lr=args.learning_rate, eps=1e-5,
                                           reduce_norm=sum_over_ranks if data_parallel
                                           else None)
                           if agent.store is not None else None)
        self.planner, self.detector_trainer = planner, detector_trainer
        self.detector_updates = detector_updates
        cfg = agent.config
        self.action_masks = None
        if action_masks is not None:
            masks = torch.as_tensor(action_masks, dtype=torch.bool, device=self.device)
            if masks.dim() != 2 or masks.shape[1] != cfg.num_actions or not masks.any(1).all():
                raise ValueError(f"action_masks must be [games, {cfg.num_actions}] bool with "
                                 f"at least one action per game, got {tuple(masks.shape)} "
                                 f"with {masks.sum(1).tolist()} actions (build them with "
                                 "ooc_moe.train.action_masks)")
            self.action_masks = masks
        self.obs_shape = (cfg.obs_shape[0] * cfg.frame_stack, *cfg.obs_shape[1:])
        self.buffer = RolloutBuffer(args, self.obs_shape, agent.context_len, self.device,
                                    agent.token_dim)
        self.windows = ContextWindows(args.num_envs, agent.context_len, agent.token_dim,
                                      self.device)
        # per MoE layer, [games, experts] counts of the rollouts' routing, and router entropy
        self.routing_counts = [np.zeros((cfg.num_envs, layer.routed_experts()))
                               for layer in agent.moe_layers]
        self.router_entropies: list[float] = []
        self._newest: torch.Tensor | None = None   # older_tokens="recycled": last epoch's

    def phase(self, name: str):
        """A context in which the agent's store counts its calls under phase ``name``
        (``TieredExpertStore.in_phase``); nothing for agents without a store."""
        store = self.agent.store
        return nullcontext() if store is None else store.in_phase(name)

    # -- acting ------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: torch.Tensor, new_episode: torch.Tensor, games: torch.Tensor,
            windows: ContextWindows | None = None, routing_games: torch.Tensor | None = None):
        """Encode each observation once, push it into its window (the trainer's own, or
        ``windows`` for evaluation), sample actions. ``routing_games``: the games to route
        with (default: ``routing_games(obs, games)``). Returns action, log-probability, value
        and each MoE layer's ``[tokens, top_k]`` expert choices."""
        if routing_games is None:
            routing_games = self.routing_games(obs, games)
        if self.planner is not None:               # prefetch before the step computes
            self.planner.plan(obs, routing_games)
        tokens = (windows or self.windows).push(self.agent.encode(obs), new_episode)
        logits, value, _ = self.agent(tokens, routing_games)
        routing = [layer.last_routing for layer in self.agent.moe_layers]
        if self.planner is not None:
            self.planner.observe([r.expert_indices for r in routing])
        dist = self.policy(logits, games)
        action = dist.sample()
        return action, dist.log_prob(action), value, routing

    def policy(self, logits: torch.Tensor, played: torch.Tensor) -> Categorical:
        """The action distribution of ``logits``, masked to each played game's actions when
        the trainer has ``action_masks``."""
        if self.action_masks is not None:
            logits = logits.masked_fill(~self.action_masks[played],
                                        torch.finfo(logits.dtype).min)
        return Categorical(logits=logits)

    def count_routing(self, routing: list, games: torch.Tensor, counts: list) -> None:
        """Add each layer's expert choices to its ``[games, experts]`` table in ``counts``;
        every token of a window belongs to its environment's game."""
        for table, r in zip(counts, routing):
            per_env = r.expert_indices.numel() // len(games)
            np.add.at(table, (games.repeat_interleave(per_env).cpu().numpy(),
                              r.expert_indices.reshape(-1).cpu().numpy()), 1)

    def routing_games(self, obs: torch.Tensor, games: torch.Tensor) -> torch.Tensor | None:
        """For agents that route by game: per environment, the game the detector sees among
        the games it names reliably (``DetectorTrainer.known_games``), or the one being played
        where the detector cannot name it yet (a new game's first rollouts, until the detector
        names its frames; the untrained agent's evaluation), and everywhere without a
        detector; None for the others."""
        if not self.agent.routes_by_game:
            return None
        if self.detector_trainer is None:
            return games
        predicted = self.detector_trainer.predict_games(obs)                # per environment
        if predicted is None:
            return games
        known = self.detector_trainer.known_games().to(self.device)
        return torch.where(known[games], predicted.to(self.device), games)

    # -- one iteration: rollout + update -------------------------------------------------
    def collect(self, env, state: dict, game: int) -> list[tuple[float, int]]:
        """Fill the buffer with ``num_steps`` steps; returns finished (return, length)."""
        b, args = self.buffer, self.args
        b.roll_prefix()
        self._newest = None                   # nothing of the last rollout is recycled
        finished = []
        for step in range(args.num_steps):
            obs = state["obs"]
            obs = obs.contiguous(memory_format=torch.channels_last)  # as the encoders want it
            b.frames[b.prefix + step] = obs
            b.starts[b.prefix + step] = state["new_episode"]
            b.dones[step] = state["next_done"].float()
            games = torch.full((args.num_envs,), game, dtype=torch.long, device=self.device)
            obs_device = obs.to(self.device)
            routed = self.routing_games(obs_device, games)
            b.games[step] = games if routed is None else routed  # the update routes the same
            b.played[step] = games
            action, logprob, value, routing = self.act(
                obs_device, state["new_episode"].to(self.device), games, routing_games=routed)
            if b.tokens is not None:
                b.tokens[step] = self.windows.tokens[:, -1]
            self.count_routing(routing, games, self.routing_counts)
            if routing:
                self.router_entropies.append(router_entropy(routing[-1].router_logits))
            b.actions[step], b.logprobs[step], b.values[step] = action, logprob, value
            next_obs, reward, terminated, truncated, info = env.step(action.cpu().numpy())
            done = np.logical_or(terminated, truncated)
            life_lost = (info["lives"] < state["lives"]) & ~done
            state["lives"] = info["lives"]
            state["episode_return"] += reward
            state["episode_length"] += 1
            for i in np.flatnonzero(done):
                finished.append((float(state["episode_return"][i]),
                                 int(state["episode_length"][i])))
                state["episode_return"][i] = 0.0
                state["episode_length"][i] = 0
            b.rewards[step] = torch.as_tensor(np.sign(reward), dtype=torch.float32,
                                              device=self.device)
            state["obs"] = torch.as_tensor(next_obs)
            state["new_episode"] = torch.as_tensor(done)
            state["next_done"] = torch.as_tensor(
                done | life_lost if args.life_loss_terminal else done)
            if self.detector_trainer is not None:
                self.detector_trainer.add(obs, games.cpu())
        if self.detector_trainer is not None:
            for _ in range(self.detector_updates):
                self.detector_trainer.step()
        with torch.no_grad():                      # bootstrap from the next observation
            windows = self.windows.tokens.clone()
            windows = torch.cat([windows[:, 1:], self.agent.encode(
                state["obs"].to(self.device))[:, None]], 1)
            fresh = state["new_episode"].to(self.device)
            windows[fresh] = windows[fresh, -1:].expand(-1, windows.shape[1], -1)
            routed = b.games[-1] if self.agent.routes_by_game else None   # as the last step
            state["next_value"] = self.agent(windows, routed)[1]
        return finished

    def advantages(self, next_value: torch.Tensor, next_done: torch.Tensor):
        """GAE, as CleanRL computes it."""
        b, args = self.buffer, self.args
        advantages = torch.zeros_like(b.rewards)
        lastgaelam = 0
        for t in reversed(range(args.num_steps)):
            if t == args.num_steps - 1:
                nextnonterminal, nextvalues = 1.0 - next_done, next_value
            else:
                nextnonterminal, nextvalues = 1.0 - b.dones[t + 1], b.values[t + 1]
            delta = b.rewards[t] + args.gamma * nextvalues * nextnonterminal - b.values[t]
            lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
            advantages[t] = lastgaelam
        return advantages, advantages + b.values

    def minibatches(self, first_epoch: bool = False):
        """One epoch's minibatches: ``(mb_inds, windows)``, ``mb_inds`` into the flattened
        ``[num_steps * num_envs]`` (step-major) buffers, ``windows [len(mb_inds), T, dim]``
        encoded with the current encoder (``PPOArgs.minibatches`` says how they are drawn).
        ``first_epoch``: the parameters are still the rollout's, so random minibatches take the
        older tokens of the rollout's own frames from ``buffer.tokens``; in later epochs they
        are the newest tokens of the epoch before (``older_tokens="recycled"``: only the
        prefix frames are encoded again) or encoded again (``"fresh"``)."""
        args, b, agent = self.args, self.buffer, self.agent
        S, N, T = args.num_steps, args.num_envs, agent.context_len
        index = b.window_index(T)                                     # [S, N, T]
        if T == 1 or args.minibatches == "random":
            frames = b.frames.flatten(0, 1)                  # [(P+S)*N, C, H, W], frame-major
            keys = (index * N + torch.arange(N)[None, :, None]).flatten(0, 1)   # [S*N, T]
            older, recycle = None, T > 1 and args.older_tokens == "recycled"
            batches = torch.randperm(args.batch_size).split(args.minibatch_size)
            first_newest = None
            if T > 1:         # the older tokens of every frame, without gradient
                reuse = b.tokens.flatten(0, 1) if first_epoch else (self._newest if recycle
                                                                     else None)
                if reuse is None:
                    older, first_newest = self._fresh_tokens(frames, keys[batches[0], -1])
                else:
                    with torch.no_grad():
                        older = torch.cat([agent.encode(f.to(self.device)) for f in
                                           frames[:b.prefix * N].split(args.minibatch_size)]
                                          + [reuse])
            if recycle:
                self._newest = torch.empty(S * N, agent.token_dim, device=self.device)
            for i, mb_inds in enumerate(batches):
                windows = self._windows_of(frames, keys[mb_inds], older,
                                           first_newest if i == 0 else None)
                if recycle:                # this step's token, for the next epoch to recycle
                    self._newest[mb_inds.to(self.device)] = windows[:, -1].detach()
                yield mb_inds, windows
            return
        for mb_envs in torch.randperm(N).split(args.envs_per_minibatch):
            n = len(mb_envs)
            frames = b.frames[:, mb_envs].to(self.device)              # [P+S, n, C, H, W]
            tokens = agent.encode(frames.flatten(0, 1)).view(frames.shape[0], n, -1)
            idx = index[:, mb_envs].to(self.device)                   # [S, n, T]
            windows = tokens[idx, torch.arange(n, device=self.device)[None, :, None]]
            mb_inds = (torch.arange(S)[:, None] * N + mb_envs[None, :]).flatten()
            yield mb_inds, windows.flatten(0, 1)                      # [S*n, T, dim]

    def _fresh_tokens(self, frames: torch.Tensor, first: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every frame's token at the current parameters (without gradient), and the
        tokens of the frames ``first`` (the first minibatch's newest) with the encoder's
        gradient: the first minibatch encodes them at these parameters anyway, so their
        detached values serve as older tokens, and only the other frames are encoded here."""
        newest = self.agent.encode(frames.index_select(0, first).to(self.device))
        rest = torch.ones(len(frames), dtype=torch.bool)
        rest[first] = False
        rest = rest.nonzero().squeeze(1)
        older = torch.empty(len(frames), self.agent.token_dim, device=self.device)
        with torch.no_grad():
            for ids in rest.split(self.args.minibatch_size):
                older[ids.to(self.device)] = self.agent.encode(
                    frames.index_select(0, ids).to(self.device))
        older[first.to(self.device)] = newest.detach()
        return older, newest

    def _windows_of(self, frames: torch.Tensor, keys: torch.Tensor,
                    older: torch.Tensor | None, newest: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """``[B, T, dim]`` windows of the frames ``keys [B, T]`` points at: the newest
        encoded now, with the encoder's gradient (or ``newest``, encoded so already), the
        older ones taken from ``older`` (the tokens of every frame, without gradient)."""
        if newest is None:
            newest = self.agent.encode(frames.index_select(0, keys[:, -1]).to(self.device))
        if older is None:
            return newest[:, None]
        return torch.cat([older[keys[:, :-1].to(self.device)], newest[:, None]], 1)

    def update(self, advantages: torch.Tensor, returns: torch.Tensor) -> dict:
        """PPO epochs over ``minibatches``; returns the last losses (CleanRL's names)."""
        args, b, agent = self.args, self.buffer, self.agent
        b_logprobs, b_actions, b_values = (b.logprobs.flatten(), b.actions.flatten(),
                                           b.values.flatten())
        b_advantages, b_returns, b_games, b_played = (advantages.flatten(), returns.flatten(),
                                                      b.games.flatten(), b.played.flatten())
        clipfracs, grad_norms = [], []
        for epoch in range(args.update_epochs):
            for mb_inds, windows in self.minibatches(first_epoch=epoch == 0):
                mb_inds = mb_inds.to(self.device)
                logits, newvalue, aux = agent(
                    windows, b_games[mb_inds] if agent.routes_by_game else None)
                dist = self.policy(logits, b_played[mb_inds])
                newlogprob, entropy = dist.log_prob(b_actions[mb_inds]), dist.entropy()
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()
                with torch.no_grad():
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean()
                                     .item())
                mb_adv = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * torch.clamp(
                    ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()
                mb_returns, mb_values = b_returns[mb_inds], b_values[mb_inds]
                if args.clip_vloss:
                    v_clipped = mb_values + torch.clamp(newvalue - mb_values, -args.clip_coef,
                                                        args.clip_coef)
                    v_loss = 0.5 * torch.max((newvalue - mb_returns) ** 2,
                                             (v_clipped - mb_returns) ** 2).mean()
                else:
                    v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef + aux
                self.dense_opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.data_parallel:
                    average_gradients(agent.parameters(), self.expert_opt)
                grad_norms.append(clip_grad_norm_(agent.parameters(), args.max_grad_norm,
                                                  self.expert_opt))
                self.dense_opt.step()
                if self.expert_opt is not None:
                    with self.phase("optimizer"):
                        self.expert_opt.step()
            if args.target_kl is not None and self.mean_over_ranks(approx_kl) > args.target_kl:
                break
        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        return {"losses/value_loss": v_loss.item(), "losses/policy_loss": pg_loss.item(),
                "losses/entropy": entropy_loss.item(), "losses/aux_loss": aux.item(),
                "losses/old_approx_kl": old_approx_kl.item(),
                "losses/approx_kl": approx_kl.item(),
                "losses/clipfrac": float(np.mean(clipfracs)),
                "losses/grad_norm": float(torch.stack(grad_norms).mean()),
                "losses/explained_variance":
                    float("nan") if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)}

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the ranks when ``data_parallel`` (every rank calls it)."""
        if not self.data_parallel:
            return value
        return sum_over_ranks(value) / world_info()[1]

    def set_learning_rate(self, lr: float) -> None:
        for group in self.dense_opt.param_groups:
            group["lr"] = lr
        if self.expert_opt is not None:
            self.expert_opt.lr = lr

    def start(self, env, seed: int) -> dict:
        """Reset ``env`` and return the loop state."""
        obs, info = env.reset(seed=seed)
        n = self.args.num_envs
        return {"obs": torch.as_tensor(obs), "new_episode": torch.ones(n, dtype=torch.bool),
                "next_done": torch.ones(n, dtype=torch.bool), "lives": info["lives"],
                "episode_return": np.zeros(n), "episode_length": np.zeros(n, dtype=np.int64)}

    def iteration(self, env, state: dict, game: int) -> dict:
        """One rollout and one update; returns the logs (CleanRL's names)."""
        started = time.perf_counter()
        with self.phase("rollout"):
            finished = self.collect(env, state, game)
        advantages, returns = self.advantages(state["next_value"],
                                              state["next_done"].float().to(self.device))
        with self.phase("update"):
            logs = self.update(advantages, returns)
        logs["charts/learning_rate"] = self.dense_opt.param_groups[0]["lr"]
        logs["charts/SPS"] = self.args.batch_size / (time.perf_counter() - started)
        logs["charts/episodic_returns"] = [r for r, _ in finished]
        logs["charts/episodic_lengths"] = [n for _, n in finished]
        return logs

//! The learning rate at each step: linear warm-up, then the recipe's decay.

use crate::spec::Schedule;

/// A schedule resolved to optimizer steps.
#[derive(Clone, Copy, Debug)]
pub struct LearningRate {
    /// Peak rate.
    pub peak: f64,
    /// Decay after warm-up.
    pub schedule: Schedule,
    /// Steps of linear warm-up.
    pub warmup_steps: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// Steps per epoch (for step decays measured in epochs).
    pub steps_per_epoch: u64,
}

impl LearningRate {
    /// The rate used by step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.schedule {
            Schedule::Constant => self.peak,
            Schedule::Linear { final_lr } => self.peak + (final_lr - self.peak) * progress,
            Schedule::Cosine { final_lr } => {
                final_lr
                    + (self.peak - final_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::Step {
                every_epochs,
                factor,
            } => {
                let decays = step / (every_epochs as u64 * self.steps_per_epoch).max(1);
                self.peak * factor.powi(decays as i32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(schedule: Schedule) -> LearningRate {
        LearningRate {
            peak: 1.0,
            schedule,
            warmup_steps: 10,
            total_steps: 110,
            steps_per_epoch: 20,
        }
    }

    #[test]
    fn warmup_then_decay() {
        let linear = rate(Schedule::Linear { final_lr: 0.0 });
        assert_eq!(linear.at(0), 0.1);
        assert_eq!(linear.at(9), 1.0);
        assert_eq!(linear.at(10), 1.0);
        assert_eq!(linear.at(60), 0.5);
        assert_eq!(linear.at(110), 0.0);
        let cosine = rate(Schedule::Cosine { final_lr: 0.5 });
        assert!((cosine.at(60) - 0.75).abs() < 1e-12);
        assert!((cosine.at(110) - 0.5).abs() < 1e-12);
        let step = rate(Schedule::Step {
            every_epochs: 2,
            factor: 0.1,
        });
        assert_eq!(step.at(39), 1.0);
        assert!((step.at(40) - 0.1).abs() < 1e-12);
        assert!((step.at(80) - 0.01).abs() < 1e-12);
        assert_eq!(rate(Schedule::Constant).at(100), 1.0);
    }
}

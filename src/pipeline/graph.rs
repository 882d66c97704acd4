//! Model calls as CUDA graphs: the first call runs eagerly (it fills the memory pool), the second
//! is captured and every later one replays the graph after copying the new inputs into the captured
//! input buffers. On the CPU it simply calls. The graph path is UNTESTED ON A GPU; it runs on the software device in CI.

use crate::backend::Device;
use crate::tensor::Tensor;
use anyhow::Result;

pub struct StepGraph {
    device: Device,
    calls: usize,
    /// What the captured call computes beyond its input shapes (guidance scale, …).
    key: String,
    #[cfg(feature = "gpu")]
    captured: Option<Captured>,
}

#[cfg(feature = "gpu")]
struct Captured {
    graph: crate::backend::cuda::Graph,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
    /// The tensors last copied into `inputs`, kept alive so an unchanged one (the text context,
    /// the control image) is not copied again every step.
    last: Vec<Option<Tensor>>,
}

impl StepGraph {
    pub fn new(device: &Device) -> StepGraph {
        StepGraph {
            device: device.clone(),
            calls: 0,
            key: String::new(),
            #[cfg(feature = "gpu")]
            captured: None,
        }
    }

    /// `f(inputs)`, replayed from a graph on a GPU once the same `key` and input shapes have been
    /// seen twice. `key` must name every parameter `f` bakes into the graph (scales, flags).
    pub fn run(
        &mut self,
        key: &str,
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        if key != self.key {
            self.key = key.to_string();
            self.calls = 0;
            #[cfg(feature = "gpu")]
            {
                self.captured = None;
            }
        }
        self.calls += 1;
        #[cfg(feature = "gpu")]
        if let Device::Gpu(gpu) = &self.device {
            let same_shapes = |c: &Captured| {
                c.inputs.len() == inputs.len()
                    && c.inputs
                        .iter()
                        .zip(inputs)
                        .all(|(a, b)| a.shape() == b.shape())
            };
            if self.captured.as_ref().is_some_and(|c| !same_shapes(c)) {
                self.captured = None;
                self.calls = 1;
            }
            if self.calls == 1 {
                return f(inputs);
            }
            if self.captured.is_none() {
                // Inputs get buffers of their own that the graph reads; outputs stay alive with it.
                let statics: Vec<Tensor> = inputs
                    .iter()
                    .map(|t| t.narrow0(0, t.shape().first().copied().unwrap_or(1)))
                    .collect();
                gpu.synchronize()?;
                gpu.begin_capture()?;
                let out = f(&statics);
                let graph = gpu.end_capture();
                let outputs = out?;
                let graph = graph?;
                let last = vec![None; statics.len()];
                self.captured = Some(Captured {
                    graph,
                    inputs: statics,
                    outputs,
                    last,
                });
            }
            let c = self.captured.as_mut().expect("captured above");
            for ((dst, src), last) in c.inputs.iter().zip(inputs).zip(c.last.iter_mut()) {
                let s = src.dev().expect("device input");
                if last
                    .as_ref()
                    .and_then(|l| l.dev())
                    .is_some_and(|l| l.same(s))
                {
                    continue;
                }
                dst.dev().expect("device input").copy_from(s);
                *last = Some(src.clone());
            }
            c.graph.launch()?;
            // Copies: the next replay overwrites the captured outputs.
            return Ok(c
                .outputs
                .iter()
                .map(|o| o.narrow0(0, o.shape()[0]))
                .collect());
        }
        let _ = &self.device;
        f(inputs)
    }
}
